"""The search loop with FakeRunner and tmp sqlite: records, cache, pruning, failures, resume."""

import json

import optuna
import pytest
import torch
from optuna.trial import TrialState

from greenopt.config import FidelitySpec, SearchSpec, SpaceSpec, Variant, load_variant
from greenopt.errors import ConfigError, GreenoptError
from greenopt.label import goal, load_scheme
from greenopt.report.plot import render_front
from greenopt.search import pareto, prepare_study, records, search, to_json, worker
from greenopt.search.rundir import run_dir
from greenopt.search.storage import SPEC_ATTR, make_sampler
from greenopt.testing.search import FakeRunner

optuna.logging.set_verbosity(optuna.logging.WARNING)
EU = load_scheme("relative-eu")
SMALL = SpaceSpec(bits=(8, 4), layer_groups=2, prune=("2:4",), depth_drop_max=0.25, ffn_keep_min=0.75)


@pytest.fixture
def tmp_path(tmp_path_factory):
    """A tmp dir on tmpfs when there is one: sqlite commits fsync, which costs ~10 ms on disk."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp("search")
        return
    d = Path(tempfile.mkdtemp(dir=shm, prefix="greenopt-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def with_plots():
    """Requested by the one test that checks the plots."""


@pytest.fixture(autouse=True)
def no_plots(request, monkeypatch):
    """Plots cost ~0.5 s per search; only tests requesting ``with_plots`` draw them."""
    if "with_plots" not in request.fixturenames:
        monkeypatch.setattr("greenopt.report.plot.write_plots", lambda *a, **k: {})


def make_spec(tmp_path, **kw):
    base = dict(target="C", n_trials=10, runs_dir=str(tmp_path), space=SMALL, seed=1, warm_start=False)
    return SearchSpec(**{**base, **kw})


def load(spec):
    return optuna.load_study(study_name=spec.resolved_study_name, storage=run_dir(spec).sqlite_url)


def test_search_records_front_and_choice(tmp_path, with_plots):
    spec = make_spec(tmp_path)
    seen = []
    res = search(spec, runner=FakeRunner(), on_trial=lambda r, best: seen.append((r.number, best)))
    study = load(spec)
    recs = records(study)
    assert len(study.trials) == 10 and [r.number for r in recs] == list(range(10))
    assert recs[0].is_baseline and recs[0].state == "COMPLETE" and recs[0].variant == Variant()
    assert [n for n, _ in seen] == list(range(10))
    rd = run_dir(spec)
    for r in recs:  # the file and the study attr hold the same record
        assert json.loads(rd.trial_path(r.number).read_text()) == r.model_dump(mode="json")
    assert {r.number for r in res.front} == {r.number for r in pareto.front(recs)}
    chosen = pareto.select(recs, goal(EU, "C"))
    assert chosen is not None and res.chosen.number == chosen.number and res.chosen.worst_letter in "ABC"
    assert load_variant(rd.chosen).steps == chosen.variant.steps
    assert res.export_command == f"greenopt export {rd.root} --pick best --out {rd.root / 'export'}"
    assert rd.png.stat().st_size > 1000 and "<svg" in rd.html.read_text()
    assert json.loads(rd.result.read_text()) == json.loads(json.dumps(to_json(res)))
    assert (rd.root / "environment.json").is_file() and (rd.root / "search.yaml").is_file()
    confirmed_off_front = [r for r in res.trials if r.confirmed and not r.on_front]
    assert render_front(res).row_count == len(res.front) + len(confirmed_off_front)
    assert study.user_attrs[SPEC_ATTR] == spec.model_dump(mode="json")


def test_constraints_reach_the_sampler(tmp_path):
    spec = make_spec(tmp_path, max_drop=0.02, n_trials=6)
    search(spec, runner=FakeRunner())
    for t in load(spec).get_trials(states=(TrialState.COMPLETE,)):
        rec = pareto.TrialRecord.model_validate(t.user_attrs["record"])
        assert t.constraints == dict(zip(("class", "accuracy_drop"), rec.constraint))
        assert (max(rec.constraint) <= 0) == pareto.feasible(rec, goal(EU, "C", 0.02))


def test_repeated_variant_hits_the_cache(tmp_path):
    tiny = SpaceSpec(bits=(), prune=(), depth_drop_max=0.2, ffn_keep_min=1.0, dtypes=())  # depth 0..2: 3 variants
    runner = FakeRunner(num_layers=10)
    search(make_spec(tmp_path, space=tiny, n_trials=12, sampler="random"), runner=runner)
    recs = records(load(make_spec(tmp_path, space=tiny)))
    assert len(runner.calls) == len(set(runner.calls)) <= 3
    hits = [r for r in recs if r.cached_from is not None]
    assert len(hits) == 12 - len(runner.calls)
    for h in hits:
        src = recs[h.cached_from]
        assert src.variant_hash == h.variant_hash and src.energy == h.energy and src.cached_from is None


def test_pruned_trials_are_recorded_with_reason(tmp_path):
    spec = make_spec(tmp_path, fidelity=FidelitySpec(perplexity_cut=1.05, energy_cut=None), n_trials=8)
    res = search(spec, runner=FakeRunner())
    pruned = [r for r in records(load(spec)) if r.state == "PRUNED"]
    assert pruned and all(r.reason.startswith("perplexity:") and r.quick.perplexity_ratio > 1.05 for r in pruned)
    assert len(load(spec).get_trials(states=(TrialState.PRUNED,))) == len(pruned) == res.counts["PRUNED"]


def test_energy_cut_uses_the_quick_look(tmp_path):
    spec = make_spec(tmp_path, target="A", n_trials=8,
                     fidelity=FidelitySpec(perplexity_cut=None, energy_cut=1.0))
    search(spec, runner=FakeRunner(half_width=0.5))
    recs = records(load(spec))
    pruned = [r for r in recs if r.state == "PRUNED"]
    assert pruned and all(r.reason.startswith("energy:") and r.quick.comparison.eei_ci[0] > 41 for r in pruned)
    assert all(r.energy <= 41 * 1.0 + 1.0 for r in recs if r.state == "COMPLETE" and not r.is_baseline)


def test_failing_trials_do_not_stop_the_loop(tmp_path):
    errors = [MemoryError("no RAM"), RuntimeError("kernel broke"), torch.OutOfMemoryError("CUDA out of memory")]
    count = {"n": 0}

    def fail(v):
        if v.is_baseline:
            return None
        count["n"] += 1
        return errors[count["n"] - 1] if count["n"] <= 3 else None

    res = search(make_spec(tmp_path, n_trials=7), runner=FakeRunner(fail=fail))
    fails = [r for r in records(load(make_spec(tmp_path))) if r.state == "FAIL"]
    assert [f.reason for f in fails] == ["out of memory: no RAM", "RuntimeError: kernel broke",
                                        "out of memory: CUDA out of memory"]
    assert res.counts["FAIL"] == 3 and sum(res.counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) == 7


def test_a_failing_baseline_stops_the_search(tmp_path):
    with pytest.raises(GreenoptError, match="baseline trial failed"):
        search(make_spec(tmp_path), runner=FakeRunner(fail=lambda v: RuntimeError("x") if v.is_baseline else None))


def test_ctrl_c_leaves_a_resumable_study(tmp_path):
    spec = make_spec(tmp_path, n_trials=6)
    calls = {"n": 0}

    def interrupt(v):
        calls["n"] += 1
        return KeyboardInterrupt() if calls["n"] == 4 else None

    res = search(spec, runner=FakeRunner(fail=interrupt))
    assert res.interrupted
    study = load(spec)
    last = study.trials[-1]
    assert last.state == TrialState.FAIL and last.user_attrs["record"]["reason"] == "interrupted"
    assert res.counts["lost"] == 1
    res2 = search(spec, runner=FakeRunner(), resume=True)
    recs = records(load(spec))
    assert not res2.interrupted
    assert sum(not r.lost for r in recs) == 6 and len({r.number for r in recs}) == len(recs)


def test_resume_after_kill_marks_running_trials_failed_and_completes_the_budget(tmp_path):
    spec = make_spec(tmp_path, n_trials=3)
    search(spec, runner=FakeRunner())
    study = load(spec)
    study.ask()  # a trial left RUNNING by a process that was killed
    assert study.trials[-1].state == TrialState.RUNNING
    longer = spec.model_copy(update={"n_trials": 6})
    res = search(longer, runner=FakeRunner(), resume=True)
    study = load(spec)
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    assert res.counts["lost"] == 1 and sum(res.counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) == 6
    numbers = [r.number for r in records(study)]
    assert len(numbers) == len(set(numbers)) == 6


def test_resume_after_kill_during_the_baseline_reruns_it(tmp_path):
    spec = make_spec(tmp_path, n_trials=4)
    runner = FakeRunner()
    with pytest.raises(GreenoptError):  # baseline fails hard the first time: nothing else runs
        search(spec, runner=FakeRunner(fail=lambda v: RuntimeError("x")))
    res = search(spec, runner=runner, resume=True)
    assert res.baseline is not None and runner.calls[0] == Variant().hash


def test_run_dir_conflicts_are_clear(tmp_path):
    spec = make_spec(tmp_path, n_trials=3, name="run")
    search(spec, runner=FakeRunner())
    with pytest.raises(ConfigError, match="already exists"):
        search(spec, runner=FakeRunner())
    with pytest.raises(ConfigError, match="different spec.*target"):
        search(spec.model_copy(update={"target": "B"}), runner=FakeRunner(), resume=True)
    res = search(spec, runner=FakeRunner(), force=True)  # start over
    assert sum(res.counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) == 3


def test_unreachable_target_is_reported_plainly(tmp_path):
    res = search(make_spec(tmp_path, target="A", max_drop=0.0, n_trials=4), runner=FakeRunner())
    assert res.chosen is None and res.chosen_path is None and not run_dir(make_spec(tmp_path)).chosen.exists()
    assert res.unreachable.message.startswith("No variant reached class A")
    assert res.export_command is None


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "random"])
def test_every_sampler_is_seeded(sampler):
    from greenopt.search.space import baseline_params, sample
    from greenopt.testing.search import surrogate

    def run():
        spec = SearchSpec(sampler=sampler, n_trials=12, space=SMALL, seed=3)
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(spec))
        study.enqueue_trial(baseline_params(SMALL, 12))
        hashes = []
        for _ in range(12):
            t = study.ask()
            v = sample(t, SMALL, 12)
            eei, loss, _ = surrogate(v, 12)
            t.set_constraint("class", eei - 64)
            study.tell(t, [0.6 - loss, eei])
            hashes.append(v.hash)
        return hashes

    first = run()
    assert first == run() and first[0] == Variant().hash and len(set(first)) > 3


def test_nsga2_population_is_small_for_small_budgets():
    assert make_sampler(SearchSpec(sampler="nsga2", n_trials=20))._population_size == 10
    assert make_sampler(SearchSpec(sampler="nsga2", n_trials=6))._population_size == 3


def test_estimated_tier_is_marked(tmp_path):
    res = search(make_spec(tmp_path, n_trials=4), runner=FakeRunner(tier="E1"))
    assert res.estimated and all(r.display.startswith("~") for r in res.trials)


def test_absolute_scheme_minimises_joules_per_token(tmp_path):
    spec = make_spec(tmp_path, scheme="absolute-go1", target="C", n_trials=5)
    with pytest.raises(ConfigError, match="grades only GO-1 .*pass --protocol go1"):  # not under the cpu preset
        search(spec, runner=FakeRunner())
    spec = spec.model_copy(update={"fidelity": spec.fidelity.model_copy(update={"protocol": "go1"})})
    res = search(spec, runner=FakeRunner(protocol_id="GO-1/b1"))
    assert res.metric == "joules_per_token" and res.objectives[1] == "minimize J/token"
    for r in res.trials:
        assert r.energy == r.joules_per_token


def test_timeout_stops_early(tmp_path):
    # the limit counts from the start of search(): opening the sqlite study alone takes ~0.2 s
    spec = make_spec(tmp_path, n_trials=50, timeout_s=1.0)
    res = search(spec, runner=FakeRunner(sleep_s=0.1))
    ran = sum(res.counts.values())
    assert 1 <= ran < 50
    assert load(spec).user_attrs["greenopt.stop_reason"] == f"time limit of 1 s reached after {ran} trials"


def test_unknown_target_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a class"):
        search(make_spec(tmp_path, target="Z"), runner=FakeRunner())


def test_worker_runs_trials_of_a_prepared_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    spec = make_spec(tmp_path, storage=url, study_name="shared", n_trials=6)
    prepare_study(spec, num_layers=12)
    first = worker(url, "shared", n_trials=2, runner=FakeRunner())
    rest = worker(url, "shared", runner=FakeRunner(device_name="other device"))
    assert [r.number for r in first] == [0, 1] and first[0].is_baseline
    assert len(rest) == 4 and all(r.device == "other device" for r in rest)
    with pytest.raises(ConfigError, match="no study"):
        worker(url, "missing", runner=FakeRunner())


def test_constraints_can_be_kept_from_the_sampler(tmp_path):
    spec = make_spec(tmp_path, n_trials=4, constrain_sampler=False)
    search(spec, runner=FakeRunner())
    trials = load(spec).get_trials(states=(TrialState.COMPLETE,))
    assert trials and all(t.constraints == {} for t in trials)
    assert all(pareto.TrialRecord.model_validate(t.user_attrs["record"]).constraint for t in trials)


def test_warm_start_tries_each_single_move_right_after_the_baseline(tmp_path):
    from greenopt.search.space import build, single_moves

    spec = make_spec(tmp_path, n_trials=9, warm_start=True)
    singles = [build(p, spec.space, 12) for p in single_moves(spec.space, 12)]
    assert len(singles) >= 5 and all(len(v.steps) + (not v.deploy.is_reference) == 1 for v in singles)
    search(spec, runner=FakeRunner())
    study = load(spec)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert trials[0].user_attrs["baseline"]
    ran = [pareto.TrialRecord.model_validate(t.user_attrs["record"]).variant_hash for t in trials[1:1 + len(singles)]]
    assert ran == [v.hash for v in singles]
    assert all(t.user_attrs.get("warm_start") for t in trials[1:1 + len(singles)])


def test_warm_start_is_enqueued_once_and_cut_to_the_budget(tmp_path):
    spec = make_spec(tmp_path, n_trials=3, warm_start=True)
    search(spec, runner=FakeRunner())
    assert len(load(spec).trials) == 3  # baseline + 2 singles; the rest were never queued
    search(spec.model_copy(update={"n_trials": 5}), runner=FakeRunner(), resume=True, force=True)
    study = load(spec)
    assert len(study.trials) == 5 and not any(t.state == TrialState.WAITING for t in study.trials)


# ---------------------------------------------------------------------------- failure policy, budget, summary


def _always(exc):
    return lambda v: None if v.is_baseline else exc


def test_expected_failures_keep_their_traceback(tmp_path, caplog):
    errors = iter([RuntimeError("kernel broke"), MemoryError("no RAM")])
    spec = make_spec(tmp_path, n_trials=5)
    with caplog.at_level("WARNING", logger="greenopt.search"):
        res = search(spec, runner=FakeRunner(fail=lambda v: None if v.is_baseline else next(errors, None)))
    fails = [r for r in records(load(spec)) if r.state == "FAIL"]
    assert [f.reason for f in fails] == ["RuntimeError: kernel broke", "out of memory: no RAM"]
    for f, text in zip(fails, ("RuntimeError: kernel broke", "MemoryError: no RAM")):
        assert f.traceback.startswith("Traceback") and "testing/search.py" in f.traceback and text in f.traceback
    logged = [r for r in caplog.records if r.getMessage().startswith("trial ") and "failed" in r.getMessage()]
    assert len(logged) == 2 and all(r.exc_info for r in logged)
    assert res.counts["FAIL"] == 2 and sum(res.counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) == 5


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), AttributeError("no attr 'x'"),
                                 KeyError("layer"), AssertionError("shape"), NotImplementedError("todo")])
def test_a_bug_in_the_runner_is_raised_after_recording_the_trial(tmp_path, bug):
    spec = make_spec(tmp_path, n_trials=8)
    with pytest.raises(type(bug)):
        search(spec, runner=FakeRunner(fail=_always(bug)))
    study = load(spec)
    assert len(study.trials) == 2  # the baseline, then the trial that hit the bug: nothing after it
    last = study.trials[-1]
    rec = pareto.TrialRecord.model_validate(last.user_attrs["record"])
    assert last.state == TrialState.FAIL and rec.state == "FAIL" and rec.reason.startswith(type(bug).__name__)
    assert type(bug).__name__ in rec.traceback and json.loads(run_dir(spec).trial_path(1).read_text())["traceback"]
    assert study.user_attrs["greenopt.stop_reason"].startswith("stopped by an unexpected error in trial 1")


def test_three_identical_failures_stop_the_search(tmp_path):
    spec = make_spec(tmp_path, n_trials=10)
    with pytest.raises(GreenoptError, match=r"3 identical failures.*RuntimeError: cuBLAS failed.*--resume"):
        search(spec, runner=FakeRunner(fail=_always(RuntimeError("cuBLAS failed"))))
    study = load(spec)
    assert len(study.trials) == 4 and [t.state for t in study.trials[1:]] == [TrialState.FAIL] * 3
    assert study.user_attrs["greenopt.stop_reason"] == "stopped after 3 identical failures (RuntimeError: cuBLAS failed)"
    result = json.loads(run_dir(spec).result.read_text())  # what ran is still written
    assert result["counts"]["FAIL"] == 3 and result["baseline"] is not None
    assert "in the 4 trials that ran" in result["unreachable"]["message"]
    assert "failed (RuntimeError x3)" in result["unreachable"]["message"]
    res = search(spec, runner=FakeRunner(), resume=True)  # fixed: the run goes on
    assert sum(res.counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) == 10


def test_different_failures_in_a_row_do_not_stop_the_search(tmp_path):
    errors = iter([RuntimeError("a"), RuntimeError("a"), RuntimeError("b"), RuntimeError("a"), RuntimeError("a")])
    spec = make_spec(tmp_path, n_trials=7)
    res = search(spec, runner=FakeRunner(fail=lambda v: None if v.is_baseline else next(errors, None)))
    assert res.counts["FAIL"] == 5 and load(spec).user_attrs["greenopt.stop_reason"] == "budget of 7 trials used"


class SlowPrepare(FakeRunner):
    def prepare(self, progress=None):
        import time

        time.sleep(1.2)
        super().prepare(progress)


def test_time_limit_covers_loading_the_model(tmp_path):
    spec = make_spec(tmp_path, n_trials=20, timeout_s=1.0)
    res = search(spec, runner=SlowPrepare(sleep_s=0.05))
    assert sum(res.counts.values()) == 0 and res.duration_s >= 1.2
    assert load(spec).user_attrs["greenopt.stop_reason"] == "time limit of 1 s reached after 0 trials"
    assert "No trial was fully measured" in res.unreachable.message


def test_summary_says_what_ran_and_why_it_stopped(tmp_path):
    import io

    from rich.console import Console

    from greenopt.cli.search import render_outcome
    from greenopt.records import SearchResult

    spec = make_spec(tmp_path, target="A", max_drop=0.0, n_trials=8)
    errors = iter([RuntimeError("x")] * 3)
    with pytest.raises(GreenoptError):
        search(spec, runner=FakeRunner(fail=lambda v: None if v.is_baseline else next(errors, None)))
    res = SearchResult.model_validate_json(run_dir(spec).result.read_text())
    if "stop_reason" not in SearchResult.model_fields:  # until SearchResult carries it
        object.__setattr__(res, "stop_reason", load(spec).user_attrs["greenopt.stop_reason"])
    buf = io.StringIO()
    render_outcome(res, Console(file=buf, width=400, color_system=None))
    text = buf.getvalue()
    assert "4 of 8 trials ran" in text and "within 8" not in text
    assert "stopped: stopped after 3 identical failures (RuntimeError: x)" in text
    assert "not reached: No variant reached class A" in text and "in the 4 trials that ran" in text


def test_the_pick_comes_from_confirmed_figures_not_the_lucky_search_reading(tmp_path):
    plain = search(make_spec(tmp_path, name="plain", confirm_top=0), runner=FakeRunner())
    lucky = plain.chosen
    assert lucky is not None and not lucky.confirmed
    # The search-time pick reads far worse when measured again; the others hold.
    runner = FakeRunner(confirm_eei=lambda v, eei: eei * 3 if v.hash == lucky.variant_hash else eei)
    res = search(make_spec(tmp_path, name="confirmed", confirm_top=3), runner=runner)
    assert lucky.variant_hash in runner.confirmed and len(runner.confirmed) == 3
    assert res.chosen is None or res.chosen.variant_hash != lucky.variant_hash
    rows = {r.variant_hash: r for r in res.trials}
    assert rows[lucky.variant_hash].confirmed and rows[lucky.variant_hash].search_display is not None
    assert rows[lucky.variant_hash].eei == pytest.approx(3 * rows[lucky.variant_hash].search_energy, rel=0.01)
    if res.chosen is not None:
        assert res.chosen.confirmed and res.chosen.worst_letter in "ABC"
    spec = make_spec(tmp_path, name="confirmed", confirm_top=3)
    recs = records(load(spec))  # what `greenopt export --pick best` reads
    pick = pareto.select(recs, goal(EU, "C"))
    assert (pick is None) == (res.chosen is None) and (pick is None or pick.number == res.chosen.number)
    assert res.confirm_s >= 0 and json.loads(run_dir(spec).trial_path(lucky.number).read_text())["confirmed"]


def test_a_resumed_search_does_not_confirm_twice(tmp_path):
    spec = make_spec(tmp_path, confirm_top=2, n_trials=6)
    runner = FakeRunner()
    search(spec, runner=runner)
    assert len(runner.confirmed) == 2
    again = FakeRunner()
    search(spec.model_copy(update={"n_trials": 6}), runner=again, resume=True)
    assert again.confirmed == []


@pytest.mark.parametrize("error,raised", [(RuntimeError("kernel broke"), False), (TypeError("a bug"), True)])
def test_a_failed_confirmation_leaves_the_trial_unconfirmed_and_a_bug_is_raised(tmp_path, error, raised):
    class Breaks(FakeRunner):
        def confirm(self, variant, repeats, *, progress=None):
            raise error

    spec = make_spec(tmp_path, confirm_top=2, n_trials=6)
    if raised:
        with pytest.raises(TypeError, match="a bug"):
            search(spec, runner=Breaks())
        return
    res = search(spec, runner=Breaks())
    assert not any(r.confirmed for r in res.trials)
    assert res.chosen is None or not res.chosen.confirmed  # nothing confirmed: the search's own figures decide


def test_workers_that_race_for_the_last_slot_give_the_surplus_back():
    import optuna

    from greenopt.search.storage import budget_left, over_budget

    study = optuna.create_study(directions=["maximize", "minimize"])
    a, b, c = study.ask(), study.ask(), study.ask()  # three workers saw one slot left of... three asked
    assert [over_budget(study, t, 2) for t in (a, b)] == [False, False]
    assert over_budget(study, c, 2)
    frozen = study.get_trials(deepcopy=False)[2]
    assert frozen.state.name == "FAIL" and frozen.user_attrs["over_budget"] and frozen.user_attrs["lost"]
    assert budget_left(study, 2) == 0  # the surplus trial holds no slot
