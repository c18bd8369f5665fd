"""The accuracy ladder: paired scores, successive halving of items, the finalists' paired tests."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from greenopt.config import DepthStep, EvalSpec, FidelitySpec, SearchSpec, SpaceSpec, Variant
from greenopt.errors import ConfigError
from greenopt.evaluate.paired import paired_accuracy, rung_score
from greenopt.label import goal, load_scheme
from greenopt.records import EvalResult, RungScore, TaskScore, TrialRecord
from greenopt.search import search
from greenopt.search.rungs import finalist_tests, promote
from greenopt.search.storage import records
from greenopt.testing.search import FakeRunner, fake_comparison

SMALL = SpaceSpec(bits=(16, 8, 4), methods=("hqq",), layer_groups=2, lm_head_bits=(16,), prune=(),
                  depth_drop_max=0.5, ffn_keep_min=0.5, moefy_experts=(), moefy_top_k=())


def ev(*tasks: tuple[str, tuple[float, ...]], limit: int | None = 4, seed: int = 0) -> EvalResult:
    return EvalResult(scores=tuple(TaskScore(task=t, metric="acc", value=sum(v) / len(v), n=len(v), items=v)
                                   for t, v in tasks), limit=limit, seed=seed)


# ---------------------------------------------------------------------------- paired accuracy


def test_paired_accuracy_averages_the_tasks_and_adds_their_errors_in_quadrature():
    cand = ev(("a", (1, 1, 0, 0)), ("b", (1, 0, 1, 0)))
    base = ev(("a", (1, 1, 1, 0)), ("b", (1, 0, 1, 1)))
    p = paired_accuracy(cand, base)
    assert p.diff == pytest.approx(-0.25) and p.n == 8
    # each task: d = (0,0,-1,0): mean -0.25, sd 0.5, se 0.25; two tasks: sqrt(2 * 0.25^2) / 2
    assert p.stderr == pytest.approx(math.sqrt(2 * 0.25 ** 2) / 2)
    assert p.z == pytest.approx(p.diff / p.stderr)
    assert rung_score(cand, base).delta == pytest.approx(-0.25)


def test_paired_accuracy_refuses_different_items_and_needs_per_item_values():
    a = ev(("a", (1, 0, 1, 0)))
    with pytest.raises(ConfigError, match="same items"):
        paired_accuracy(a, ev(("a", (1, 0, 1, 0)), limit=8))
    with pytest.raises(ConfigError, match="same tasks"):
        paired_accuracy(a, ev(("b", (1, 0, 1, 0))))
    bare = EvalResult(scores=(TaskScore(task="a", metric="acc", value=0.5, n=4),), limit=4, seed=0)
    assert paired_accuracy(bare, a) is None
    assert rung_score(bare, a).delta == pytest.approx(0.0)  # falls back to the plain means, no SE


# ---------------------------------------------------------------------------- config


def test_rungs_must_grow_and_the_ladder_starts_at_the_first_limit():
    assert FidelitySpec().ladder == (100, 300)
    assert FidelitySpec(eval=EvalSpec(limit=50), rungs=(200, None)).ladder == (50, 200, None)
    assert FidelitySpec(eval=EvalSpec(limit=400), rungs=(300,)).ladder == (400,)  # rungs below the first: none
    assert FidelitySpec(eval=EvalSpec(limit=None)).ladder == (None,)
    for bad in ((300, 200), (None, 300), (1,)):
        with pytest.raises(ValidationError, match="rung"):
            FidelitySpec(rungs=bad)


def test_a_recipe_sets_the_ladder_and_a_bad_one_names_the_field(tmp_path):
    from greenopt.config.recipe import load_recipe

    text = ("version: 1\nmodel: default\nsearch: {target: A}\nevaluation:\n  tasks: [arc_easy]\n  limit: 40\n"
            "  fidelity: {rungs: [120], final_limit: 300, promote_eta: 2}\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    fid = load_recipe(path).search_spec().fidelity
    assert fid.ladder == (40, 120) and fid.final_limit == 300 and fid.promote_eta == 2
    path.write_text(text.replace("rungs: [120]", "rungs: [120, 60]"))
    with pytest.raises(ConfigError, match="rungs"):
        load_recipe(path)


# ---------------------------------------------------------------------------- promotion


def _rec(number: int, delta: float, eei_low: float) -> TrialRecord:
    cmp = fake_comparison(eei_low + 5, 5)
    rung = RungScore(limit=50, n=100, mean_accuracy=0.6 + delta, baseline_accuracy=0.6)
    return TrialRecord(number=number, state="COMPLETE", variant=Variant(steps=(DepthStep(drop=number),)),
                       variant_hash=f"h{number}", eval=ev(("a", (1, 0))), baseline_accuracy=0.6, comparison=cmp,
                       energy=cmp.eei, energy_ci=cmp.eei_ci, rungs=(rung,))


def test_promotion_takes_the_top_third_of_the_trials_that_could_reach_the_target():
    g = goal(load_scheme("relative-eu"), "A")  # EEI <= 41
    reach = [_rec(i, -0.01 * i, 30.0) for i in range(1, 6)]  # deltas -0.01 .. -0.05, all could reach
    far = [_rec(10 + i, 0.05, 80.0) for i in range(3)]  # more accurate, but out of reach: not peers
    cmp = fake_comparison(35.0, 5)

    def score(delta: float) -> RungScore:
        return RungScore(limit=50, n=100, mean_accuracy=0.6 + delta, baseline_accuracy=0.6)

    # 5 peers + itself: the top ceil(6 / 3) = 2 climb
    assert promote(reach + far, 0, score(0.0), cmp, g, eta=3)
    assert promote(reach + far, 0, score(-0.015), cmp, g, eta=3)  # second
    assert not promote(reach + far, 0, score(-0.025), cmp, g, eta=3)  # third
    assert promote([], 0, score(-0.3), cmp, g, eta=3)  # the first trial on a rung always climbs
    assert not promote(reach, 0, score(0.0), fake_comparison(60.0, 5), g, eta=3)  # cannot reach A
    tight = goal(load_scheme("relative-eu"), "A", max_drop=0.05)
    assert not promote([], 0, score(-0.2), cmp, tight, eta=3)  # far over the drop budget


# ---------------------------------------------------------------------------- the search


def ladder_spec(tmp_path, **kw) -> SearchSpec:
    fid = FidelitySpec(eval=EvalSpec(limit=50), rungs=(200, None), quick_protocol=None, perplexity_windows=0,
                       kl=None, promote_eta=2, **kw.pop("fidelity", {}))
    base = dict(target="C", n_trials=10, runs_dir=str(tmp_path), space=SMALL, seed=1, warm_start=False,
                fidelity=fid)
    return SearchSpec(**{**base, **kw})


def test_trials_near_the_front_climb_and_are_told_on_the_first_rungs_scale(tmp_path):
    spec = ladder_spec(tmp_path)
    runner = FakeRunner(ladder=spec.fidelity.ladder)
    res = search(spec, runner=runner)
    recs = [r for r in records(_study(spec)) if r.measured and not r.is_baseline]
    climbed = [r for r in recs if len(r.rungs) > 1]
    assert runner.promoted and climbed and len(climbed) < len(recs)  # some climb, not all
    assert {r.variant_hash for r in climbed} <= {h for h, _ in runner.promoted}
    for r in climbed:
        assert r.eval.limit == r.rungs[-1].limit and r.baseline_accuracy == r.rungs[-1].baseline_accuracy
        assert [g.limit for g in r.rungs] == list(spec.fidelity.ladder[:len(r.rungs)])
    study = _study(spec)
    for t in study.trials:
        rec = next((r for r in recs if r.number == t.number), None)
        if rec is not None:  # the sampler sees accuracy on the first rung's scale
            assert t.values[0] == pytest.approx(rec.rungs[0].baseline_accuracy + rec.rungs[-1].delta)
    assert res.front


def test_finalists_are_scored_on_the_full_sets_and_tested_pairwise(tmp_path, capsys):
    spec = ladder_spec(tmp_path, confirm_top=3, confirm_comparisons=2)
    runner = FakeRunner(ladder=spec.fidelity.ladder)
    res = search(spec, runner=runner)
    recs = records(_study(spec))
    finalists = [r for r in recs if r.final is not None and not r.is_baseline]
    assert len(finalists) == len([r for r in recs if r.confirmed is not None]) > 1
    assert all(r.final.limit is None and r.final_eval.scores[0].n == 570 for r in finalists)
    assert res.chosen is not None and res.chosen.items_per_task is None  # judged on the full sets
    assert res.finalists and all(t.a == res.chosen.number for t in res.finalists)
    assert len(res.finalists) == len(finalists) - 1
    assert all(t.paired.n == 570 + 1838 for t in res.finalists)
    from greenopt.cli.search import render_outcome
    from rich.console import Console

    render_outcome(res, Console(width=200))
    out = capsys.readouterr().out
    assert f"trial {res.chosen.number} vs trial {res.finalists[0].b}: " in out and " z " in out
    scored = list(runner.scored)
    search(spec, runner=runner, resume=True)  # nothing new to score on resume
    assert runner.scored == scored


def test_the_final_accuracy_decides_between_finalists(tmp_path):
    spec = ladder_spec(tmp_path, confirm_top=3, confirm_comparisons=2)
    lower = dict(ladder=spec.fidelity.ladder, confirm_eei=lambda v, e: 0.7 * e)  # every finalist keeps class C
    first = search(spec, runner=FakeRunner(**lower))
    assert first.chosen is not None

    class Worse(FakeRunner):  # the search's pick scores 20 points worse on the full sets
        def score(self, variant, limit, *, progress=None):
            res = super().score(variant, limit)
            if variant.hash != first.chosen.variant_hash:
                return res
            return self._eval(0.2, limit)

    spec2 = spec.model_copy(update={"name": "again"})
    again = search(spec2, runner=Worse(**lower))
    assert again.chosen is not None and again.chosen.variant_hash != first.chosen.variant_hash
    assert any(t.b != again.chosen.number and t.paired.diff > 0 for t in again.finalists)


def test_finalist_tests_need_the_same_final_items():
    a = _rec(1, -0.01, 30).model_copy(update={"final_eval": ev(("a", (1, 1, 0, 1)))})
    b = _rec(2, -0.02, 30).model_copy(update={"final_eval": ev(("a", (1, 0, 0, 1)))})
    c = _rec(3, -0.02, 30).model_copy(update={"final_eval": ev(("a", (1, 0, 0, 1, 1, 0)), limit=6)})
    tests = finalist_tests([a, b, c], a)
    assert [(t.a, t.b) for t in tests] == [(1, 2)] and tests[0].paired.diff == pytest.approx(0.25)
    assert tests[0].line.startswith("trial 1 vs trial 2: +25.0 points")
    assert finalist_tests([a, b], None) == ()


def _study(spec):
    import optuna

    from greenopt.search.rundir import run_dir

    return optuna.load_study(study_name=spec.resolved_study_name, storage=run_dir(spec).sqlite_url)


# ---------------------------------------------------------------------------- the real runner


def test_the_transformers_runner_climbs_and_scores_the_baseline_once_per_rung(tiny_dir):
    from greenopt.search.runner import TransformersRunner
    from greenopt.testing import FakeMeter, tiny_llama, tiny_tokenizer

    spec = SearchSpec(model=str(tiny_dir), fidelity=FidelitySpec(
        kl=None, perplexity_windows=0, quick_protocol=None, protocol="smoke",
        eval=EvalSpec(tasks=("arc_easy",), limit=3), rungs=(6,)))
    runner = TransformersRunner(spec, model=tiny_llama(), tokenizer=tiny_tokenizer(), meter=FakeMeter())
    runner.prepare()
    asked = []
    out = runner.run(Variant(steps=(DepthStep(drop=1),)), promote=lambda k, s, c: asked.append(k) or True)
    assert asked == [0] and [r.limit for r in out.rungs] == [3, 6] and out.eval.limit == 6
    assert out.eval.scores[0].items is not None and len(out.eval.scores[0].items) == 6
    assert "eval_rung1_s" in out.durations_s
    assert runner.baseline_score(6) is runner.baseline_score(6)  # scored once per limit
    final = runner.score(Variant(steps=(DepthStep(drop=1),)), 6)
    assert final.scores[0].items == out.eval.scores[0].items  # the same deployed variant, the same items


def test_the_runner_reads_the_baseline_from_the_cache_the_second_time(tiny_dir, tmp_path, monkeypatch):
    import greenopt.evaluate.cache as cache
    from greenopt.search.runner import TransformersRunner
    from greenopt.testing import FakeMeter
    from test_user_tasks import write_tasks

    monkeypatch.setenv("GREENOPT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(cache.ENV, raising=False)
    folder = write_tasks(tmp_path / "tasks")
    spec = SearchSpec(model=str(tiny_dir), fidelity=FidelitySpec(
        kl=None, perplexity_windows=0, quick_protocol=None, protocol="smoke",
        eval=EvalSpec(tasks=("my_qa",), limit=3, include_path=str(folder))))
    first = TransformersRunner(spec, meter=FakeMeter())
    first.prepare()
    assert not first.baseline_eval.cached and first.baseline_eval.scores[0].items is not None
    calls = []
    monkeypatch.setattr(cache, "evaluate", lambda *a, **k: calls.append(a) or pytest.fail("scored again"))
    again = TransformersRunner(spec, meter=FakeMeter())
    again.prepare()
    assert again.baseline_eval.cached and not calls
    assert again.baseline_eval.scores[0].items == first.baseline_eval.scores[0].items


def test_the_baseline_row_is_shown_on_the_finalists_items(tmp_path):
    spec = ladder_spec(tmp_path, confirm_top=2, confirm_comparisons=2)
    res = search(spec, runner=FakeRunner(ladder=spec.fidelity.ladder))
    assert res.baseline is not None and res.baseline.items_per_task is None  # the full sets, as the finalists
    assert res.chosen is None or res.chosen.items_per_task == res.baseline.items_per_task
