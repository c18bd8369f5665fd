"""The search: an Optuna multi-objective study over compression variants.

``search(spec)`` maximizes mean accuracy and minimizes measured energy (EEI for relative
label schemes, J/token for absolute ones), then picks, among trials whose measured class
reaches ``spec.target`` (the worse letter of the interval counts), the one that loses the
least accuracy. The study is the source of truth: trial 0 is the baseline
(``enqueue_trial``), every trial is told COMPLETE, PRUNED or FAIL through ask/tell with its
:class:`~greenopt.records.TrialRecord` as a user attribute, the sampler sees the target class
and accuracy budget as constraints, and the storage (sqlite in ``runs/NAME/`` by default, or
an RDB URL shared with ``worker`` processes) makes the search resumable.

After the budget the pick and its runner-ups are re-measured with fresh repeated comparisons
(``spec.confirm_top`` x ``spec.confirm_comparisons``); the reported class and the choice come
from those (an example is in :mod:`greenopt.search`).

Failures: an expected failure (a GreenoptError, out of memory, a kernel's RuntimeError) is
told FAIL with its traceback in the trial record and the log, and the search goes on; anything
else is a bug: the trial is recorded FAIL and the error is re-raised. Three identical failures
in a row stop the run. Ctrl-C tells the trial in flight FAIL("interrupted") and returns the
result so far (``interrupted=True``); after a kill, ``resume=True`` marks the dead process's
RUNNING trials failed and completes the budget. Lost trials do not count against it. The
budget's ``timeout_s`` covers the whole run, loading the model included; ``stop_reason`` says
what ended it. One process runs a run folder (it holds ``runs/NAME/.lock``; more processes
join a study through shared storage, as ``worker``), the storage is checked before the model
loads, and a trial's file is written only once the study holds its result.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from greenopt._io import write_json, write_text
from greenopt.config import SearchSpec, dump_yaml, protocol_preset, validated
from greenopt.env import set_threads
from greenopt.errors import ConfigError, GreenoptError
from greenopt.label import Goal, goal, grade_comparison, grade_measurement
from greenopt.records import RunOutcome, SearchResult, TrialRecord
from greenopt.report import plot
import greenopt.search.confirm as confirm
import greenopt.search.failures as failures
import greenopt.search.pareto as pareto
import greenopt.search.rundir as rundir
import greenopt.search.rungs as rungs
import greenopt.search.space as space
import greenopt.search.storage as study_storage
from greenopt.search.runner import Cuts, Progress, TransformersRunner, TrialRunner, cuts_for

log = logging.getLogger(__name__)

OnTrial = Callable[[TrialRecord, "TrialRecord | None"], None]
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ---------------------------------------------------------------------------- public verbs


def search(spec: SearchSpec, *, runner: TrialRunner | None = None, progress: Progress | None = None,
           on_trial: OnTrial | None = None, resume: bool = False, force: bool = False) -> SearchResult:
    """Runs (or resumes) a search and writes ``runs/NAME/``.

    Args:
        spec: model, target class, scheme, budget, sampler, space, fidelity, meter, storage.
        runner: the trial runner; default :class:`~greenopt.search.runner.TransformersRunner` on
            ``spec.model`` (tests pass ``greenopt.testing.search.FakeRunner``).
        progress: ``progress(stage, done, total)``; stage ``"trials"`` counts trials, other
            stages come from inside the current trial (apply, eval, measure).
        on_trial: ``on_trial(record, best_so_far)`` after each trial, for a live line.
        resume: continue the run in ``runs/NAME`` (sqlite study or ``spec.storage``).
        force: start an existing run over, or resume despite a changed spec.

    Returns:
        SearchResult, also written to ``runs/NAME/result.json`` (with ``chosen.yaml``,
        ``pareto.png`` and ``pareto.html``).

    Raises:
        ConfigError: unknown scheme or target class, a run-directory conflict, a run that
            another live process holds (``runs/NAME/.lock``), a storage that cannot be used
            (checked before the model loads), or a study that already exists in shared
            storage without ``resume``.
        GreenoptError: the baseline trial failed (nothing can be compared), or
            ``_MAX_SAME_FAILURES`` trials in a row failed the same way (``result.json`` is
            still written; fix the cause and continue with ``resume=True``).
        Exception: any other exception from a trial (a bug, not an expected failure) is
            re-raised after the trial is told FAIL with its record and traceback.

    ``spec.timeout_s`` counts from the start of this call: loading the model
    (``runner.prepare``) and the baseline are inside the time limit.
    """
    t0 = time.monotonic()  # the time limit covers the whole run, runner.prepare included
    target = _goal(spec)
    set_threads(spec.threads)
    with rundir.locked(rundir.run_dir(spec)) as rd, contextlib.ExitStack() as stack:
        storage_url = spec.storage or rd.sqlite_url
        study_storage.check_storage(storage_url)  # a bad URL or a dead server fails before the model loads
        if runner is None:  # the runner search() builds, search() closes
            runner = stack.enter_context(contextlib.closing(TransformersRunner(spec)))
        if force and not resume:
            rd.kernels.unlink(missing_ok=True)  # a run started over probes this machine again
        spec = spec.model_copy(update={"space": runner.fit_space(spec.space, rd.kernels)})
        rundir.check(spec, resume=resume, force=force)
        runner.prepare(progress)
        rundir.prepare(spec, resume=resume, force=force)
        study = study_storage.open_study(spec, storage_url, create=True, resume=resume)
        _recover(study, spec, rd)
        _ensure_baseline(study, spec, runner.num_layers)
        write_json(rd.environment, rundir.environment(runner.environment()))
        try:
            interrupted, _ = _drive(study, spec, target, runner, rd, progress, on_trial, max_trials=None,
                                    shared=spec.storage is not None, started=t0)
        except _RepeatedFailure:  # write what ran before stopping, then say why
            write_json(rd.result, _result(study, spec, target, rd, storage_url, False, time.monotonic() - t0))
            raise
        confirm_s = final_s = 0.0
        if not interrupted:
            confirm_s = confirm.confirm(study, spec, target, runner, rd, progress)
            final_s = rungs.score_finalists(study, spec, target, runner, rd, progress)
        result = _result(study, spec, target, rd, storage_url, interrupted, time.monotonic() - t0)
        result = result.model_copy(update={"confirm_s": confirm_s, "final_s": final_s})
        write_json(rd.result, result)
        return result


def worker(storage: str, study_name: str, n_trials: int | None = None, *, runner: TrialRunner | None = None,
           device: str | None = None, runs_dir: str | None = None, threads: int | None = None,
           progress: Progress | None = None, on_trial: OnTrial | None = None) -> tuple[TrialRecord, ...]:
    """Runs trials for an existing study in shared storage (``greenopt worker``).

    The worker rebuilds the SearchSpec stored in the study, scores its own baseline and
    measures every trial against the baseline on its own device, so EEI compares like with
    like. Heartbeats let a crashed worker's trial be marked failed by the others.

    Args:
        storage: the RDB URL the study lives in (``postgresql://...``).
        study_name: the study, as created by ``greenopt search --storage ...``.
        n_trials: at most this many trials from this worker (default: until the study's budget).
        runner: the trial runner (default: TransformersRunner of the stored spec).
        device: this worker's device (``cuda:1``), overriding the stored spec's.
        runs_dir: where this worker writes its trial JSON files (default: the spec's).
        progress, on_trial: as for :func:`search`.

    Returns:
        The records of the trials this worker ran.

    Raises:
        ConfigError: the storage cannot be used (checked before the model loads), or the
            study does not exist or was not created by greenopt search.
        KeyboardInterrupt: Ctrl-C, after the trial in flight was recorded as failed.
    """
    study_storage.check_storage(storage)  # a bad URL or a dead server fails before the model loads
    probe = study_storage.open_storage(storage, shared=True, heartbeat_s=60)
    try:
        raw = optuna.load_study(study_name=study_name, storage=probe).user_attrs.get(study_storage.SPEC_ATTR)
    except KeyError:
        raise ConfigError(f"no study {study_name!r} in {study_storage.redact(storage)}; start it with "
                          "`greenopt search --storage ... --name ...` first") from None
    if raw is None:
        raise ConfigError(f"study {study_name!r} was not created by greenopt search (no stored spec)")
    update = {"storage": storage, "study_name": study_name}
    update.update({k: v for k, v in (("device", device), ("runs_dir", runs_dir), ("threads", threads))
                   if v is not None})
    spec = validated(SearchSpec, {**raw, **update}, where=f"study {study_name} spec")
    target = _goal(spec)
    set_threads(spec.threads)
    rd = rundir.run_dir(spec)
    rundir.make_dirs(rd)
    done: list[TrialRecord] = []

    def collect(rec: TrialRecord, best: TrialRecord | None) -> None:
        done.append(rec)
        if on_trial:
            on_trial(rec, best)

    with contextlib.ExitStack() as stack:
        if runner is None:  # the runner worker() builds, worker() closes
            runner = stack.enter_context(contextlib.closing(_default_runner(spec)))
        runner.prepare(progress)
        study = study_storage.open_study(spec, storage, create=False)
        interrupted, _ = _drive(study, spec, target, runner, rd, progress, collect, max_trials=n_trials, shared=True)
    if interrupted:  # the trial in flight is recorded FAIL("interrupted"); the caller still sees Ctrl-C
        raise KeyboardInterrupt
    return tuple(done)


def prepare_study(spec: SearchSpec, num_layers: int) -> optuna.Study:
    """Creates the study of ``spec`` in ``spec.storage`` with the baseline enqueued, running nothing.

    For shared storage: a coordinator prepares the study, then ``worker`` processes (any
    number, on any machines) run its trials.

    Raises:
        ConfigError: ``spec.storage`` is not set.
    """
    if spec.storage is None:
        raise ConfigError("preparing a study for workers needs --storage (an RDB URL such as postgresql://...)")
    _goal(spec)
    study = study_storage.open_study(spec, spec.storage, create=True, resume=True)
    _ensure_baseline(study, spec, num_layers)
    return study


def to_json(result: SearchResult) -> dict[str, Any]:
    """A plain dict of the result (JSON-ready) for ``--json`` output."""
    return result.model_dump(mode="json")


# ---------------------------------------------------------------------------- the loop


@dataclass
class _Ctx:
    study: optuna.Study
    spec: SearchSpec
    goal: Goal
    runner: TrialRunner
    rd: rundir.RunDir
    cuts: Cuts | None
    shared: bool
    worker: str
    progress: Progress | None


STOP_REASON_ATTR = "greenopt.stop_reason"
_MAX_SAME_FAILURES = 3  # identical consecutive failures (same reason) that stop the search



class _RepeatedFailure(GreenoptError):
    """The same failure several trials in a row: more trials would only repeat it."""


def _stopped(study: optuna.Study, reason: str) -> str:
    """Records why the loop stopped (study user attr ``greenopt.stop_reason``) and logs it."""
    log.info("search stopped: %s", reason)
    try:
        study.set_user_attr(STOP_REASON_ATTR, reason)
    except Exception as e:  # noqa: BLE001 - the reason must never hide the real outcome
        log.warning("could not record the stop reason: %s", e)
    return reason


def _drive(study: optuna.Study, spec: SearchSpec, target: Goal, runner: TrialRunner, rd: rundir.RunDir,
           progress: Progress | None, on_trial: OnTrial | None, *, max_trials: int | None, shared: bool,
           started: float | None = None) -> tuple[bool, str]:
    """Runs trials until the budget, the time limit or Ctrl-C.

    ``started`` is the ``time.monotonic()`` the time limit counts from (default: now).
    Returns ``(interrupted, stop_reason)``; the reason is also stored as the study user attr
    ``greenopt.stop_reason``.

    Raises:
        GreenoptError: the baseline failed, or ``_MAX_SAME_FAILURES`` trials in a row failed
            with the same reason.
        Exception: a trial's unexpected exception (a bug), after the trial is told FAIL.
    """
    ctx = _Ctx(study, spec, target, runner, rd, cuts_for(spec, target), shared,
               f"{socket.gethostname()}:{os.getpid()}", progress)
    t0, ran = (time.monotonic() if started is None else started), 0
    same, last_fail = 0, None
    while True:
        if shared:
            study_storage.fail_stale(study)  # a dead worker's RUNNING trial would hold budget forever
        left = study_storage.budget_left(study, spec.n_trials)
        if max_trials is not None:
            left = min(left, max_trials - ran)
        if progress:
            progress("trials", spec.n_trials - study_storage.budget_left(study, spec.n_trials), spec.n_trials)
        if left <= 0:
            if max_trials is not None and ran >= max_trials:
                return False, _stopped(study, f"worker limit of {max_trials} trials reached")
            return False, _stopped(study, f"budget of {spec.n_trials} trials used")
        if spec.timeout_s is not None and time.monotonic() - t0 >= spec.timeout_s:
            return False, _stopped(study, f"time limit of {spec.timeout_s:g} s reached after {ran} trials")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
            trial = study.ask()
        if shared:
            study_storage.beat(study, trial)  # at once: a trial killed before its first beat is never stale
            if study_storage.over_budget(study, trial, spec.n_trials):
                return False, _stopped(study, f"budget of {spec.n_trials} trials used")
        try:
            rec = _run_trial(ctx, trial)
        except KeyboardInterrupt:
            log.warning("interrupted; trial %d recorded as failed, resume with --resume", trial.number)
            return True, _stopped(study, f"interrupted after {ran} trials")
        except Exception as e:
            _stopped(study, f"stopped by an unexpected error in trial {trial.number}: {failures.reason(e)}")
            raise
        ran += 1
        if rec.is_baseline and rec.state == "FAIL":
            _stopped(study, f"the baseline trial failed ({rec.reason})")
            raise GreenoptError(f"the baseline trial failed ({rec.reason}); nothing can be compared. "
                                "Fix the cause and run again with --resume")
        if on_trial:
            on_trial(rec, pareto.select(study_storage.records(study), target))
        failed = rec.state == "FAIL" and not rec.lost
        same = same + 1 if failed and rec.reason == last_fail else int(failed)
        last_fail = rec.reason if failed else None
        if same >= _MAX_SAME_FAILURES:
            _stopped(study, f"stopped after {same} identical failures ({rec.reason})")
            raise _RepeatedFailure(
                f"stopped after {same} identical failures in a row (trials {trial.number - same + 1}.."
                f"{trial.number}): {rec.reason}. The traceback is in the trial records "
                f"({rd.trial_path(rec.number)}). Fix the cause, then continue the run with --resume")


def _run_trial(ctx: _Ctx, trial: optuna.Trial) -> TrialRecord:
    t0, started = time.monotonic(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        variant = space.sample(trial, ctx.spec.space, ctx.runner.num_layers)
    except BaseException:
        ctx.study.tell(trial, state=TrialState.FAIL)
        raise
    base = {"number": trial.number, "variant": variant, "variant_hash": variant.hash, "params": dict(trial.params),
            "is_baseline": variant.is_baseline, "device": ctx.runner.device_name, "worker": ctx.worker,
            "started": started}
    try:
        with study_storage.Heartbeat(ctx.study, trial, ctx.spec.heartbeat_interval_s if ctx.shared else None):
            cached = study_storage.cached(ctx.study, variant.hash, ctx.runner.device_name, trial.number)
            if cached is not None:
                log.info("trial %d repeats trial %d (variant %s): reusing its result",
                         trial.number, cached.number, variant.hash)
                rec = cached.model_copy(update={**base, "cached_from": cached.cached_from or cached.number,
                                                "durations_s": {}})
                rec = rec.model_copy(update={"constraint": _constraint(ctx, rec)})
            else:
                outcome = ctx.runner.run(variant, cut=None if variant.is_baseline else ctx.cuts,
                                         promote=_promoter(ctx), progress=ctx.progress)
                rec = _record(ctx, base, outcome)
    except KeyboardInterrupt:
        _finish(ctx, trial, TrialRecord(**base, state="FAIL", reason="interrupted", lost=True,
                                        duration_s=time.monotonic() - t0))
        raise
    except Exception as e:
        # Expected failures (see failures.EXPECTED) are recorded and the search goes on; a bug is
        # recorded too, then re-raised (like Optuna's catch=()).
        rec = TrialRecord(**base, state="FAIL", reason=failures.reason(e), traceback=failures.traceback_text(e),
                          duration_s=time.monotonic() - t0)
        if not failures.expected(e):
            log.error("trial %d: unexpected %s (a bug, not a trial failure); recorded as failed, stopping",
                      trial.number, rec.reason)
            _finish(ctx, trial, rec)
            raise
        log.warning("trial %d failed: %s", trial.number, rec.reason, exc_info=e)
    rec = rec.model_copy(update={"duration_s": time.monotonic() - t0})
    _finish(ctx, trial, rec)
    return rec


def _promoter(ctx: _Ctx) -> Callable[..., bool]:
    def promote(rung: int, score: Any, comparison: Any) -> bool:
        return rungs.promote(study_storage.records(ctx.study), rung, score, comparison, ctx.goal,
                             ctx.spec.fidelity.promote_eta)
    return promote


def _record(ctx: _Ctx, base: dict[str, Any], out: RunOutcome) -> TrialRecord:
    baseline = out.rungs[-1].baseline_accuracy if out.rungs else ctx.runner.baseline_eval.mean_accuracy
    common = dict(base, apply=out.apply, quick=out.quick, durations_s=out.durations_s, baseline_accuracy=baseline,
                  rungs=out.rungs)
    if out.pruned:
        rec = TrialRecord(**common, state="PRUNED", reason=out.pruned)
        return rec.model_copy(update={"constraint": _constraint(ctx, rec)})
    if out.eval is None or out.comparison is None:
        raise RuntimeError("runner returned neither a pruning reason nor full figures")
    cmp = out.comparison
    if ctx.goal.scheme.relative:
        grade, energy, ci = grade_comparison(cmp, ctx.goal.scheme), cmp.eei, cmp.eei_ci
    else:
        grade = grade_measurement(cmp.candidate, ctx.goal.scheme)
        energy, ci = cmp.candidate.joules_per_token, cmp.candidate.joules_per_token_ci
    rec = TrialRecord(**common, state="COMPLETE", eval=out.eval, comparison=cmp, grade=grade,
                      energy=energy, energy_ci=tuple(ci))
    if not rec.measured:
        return rec.model_copy(update={"state": "FAIL", "reason": "not finite: accuracy or energy is NaN/inf"})
    return rec.model_copy(update={"constraint": _constraint(ctx, rec)})


def _constraint(ctx: _Ctx, rec: TrialRecord) -> tuple[float, ...]:
    return pareto.constraint_values(rec, ctx.goal)


def _finish(ctx: _Ctx, trial: optuna.Trial, rec: TrialRecord) -> None:
    """Stores the record (study attrs), tells the study the trial's state, then writes the file.

    The file comes last, so it never says what the study does not (a tell refused because
    another process finished the trial writes nothing).
    """
    try:
        for key, value in (("record", rec.model_dump(mode="json")), ("variant_hash", rec.variant_hash),
                           ("device", rec.device), ("lost", rec.lost)):
            trial.set_user_attr(key, value)
        if ctx.spec.constrain_sampler:
            for key, value in zip(("class", "accuracy_drop"), rec.constraint):
                trial.set_constraint(key, value)
        if rec.state == "COMPLETE":
            ctx.study.tell(trial, [rec.search_accuracy, rec.energy])
        else:
            ctx.study.tell(trial, state=TrialState.PRUNED if rec.state == "PRUNED" else TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError as e:
        raise GreenoptError(
            f"trial {rec.number} was finished by another process while this one ran it (a second search on "
            "the same study, or a worker that missed its heartbeats); its result was not recorded. Run one "
            "search per run folder and add workers with greenopt worker") from e
    write_json(ctx.rd.trial_path(rec.number), rec)


_LOST = "lost: left running by a process that stopped"


def _recover(study: optuna.Study, spec: SearchSpec, rd: rundir.RunDir) -> None:
    """Fails the trials a dead process left RUNNING, and rewrites the trial file of each to say so."""

    def lost(t: optuna.trial.FrozenTrial) -> TrialRecord | None:
        path, raw = rd.trial_path(t.number), t.user_attrs.get("record")
        if raw is None and path.is_file():  # written by a greenopt that wrote the file before telling
            with contextlib.suppress(ValueError):
                raw = json.loads(path.read_text())
        try:
            rec = None if raw is None else TrialRecord.model_validate(raw)
        except ValueError:
            rec = None
        if rec is None:
            path.unlink(missing_ok=True)  # a file the study has no record for would disagree with it
            return None
        return rec.model_copy(update={"state": "FAIL", "lost": True, "reason": _LOST})

    for rec in study_storage.recover(study, shared=spec.storage is not None, lost=lost):
        write_json(rd.trial_path(rec.number), rec)


def _ensure_baseline(study: optuna.Study, spec: SearchSpec, num_layers: int) -> None:
    """Enqueues the baseline as the next trial unless one is done, waiting or running."""
    keep = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    if any(t.user_attrs.get("baseline") and t.state in keep for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(space.baseline_params(spec.space, num_layers), user_attrs={"baseline": True})
    if spec.warm_start and not study.user_attrs.get("warm_started"):
        study.set_user_attr("warm_started", True)
        for params in space.single_moves(spec.space, num_layers)[:max(0, spec.n_trials - 1)]:
            study.enqueue_trial(params, user_attrs={"warm_start": True})


def _default_runner(spec: SearchSpec) -> TrialRunner:
    return TransformersRunner(spec)


def _goal(spec: SearchSpec) -> Goal:
    g = goal(spec.scheme, spec.target, spec.max_drop)
    pid = protocol_preset(spec.fidelity.protocol).id
    if not g.scheme.accepts_protocol(pid):
        raise ConfigError(f"--scheme {g.scheme.name} grades only {g.scheme.protocol} (p256-n256), but the search "
                          f"measures under {pid}; pass --protocol go1, or target a relative scheme")
    return g


# ---------------------------------------------------------------------------- result


def _result(study: optuna.Study, spec: SearchSpec, target: Goal, rd: rundir.RunDir, storage_url: str,
            interrupted: bool, duration_s: float) -> SearchResult:
    recs = study_storage.records(study)
    on_front = {r.number for r in pareto.front(recs)}
    chosen = pareto.select(recs, target)
    scheme = target.scheme
    rows = tuple(pareto.row(r, chosen=chosen is not None and r.number == chosen.number, on_front=r.number in on_front)
                 for r in recs if r.measured)
    counts = {s: sum(r.state == s and not r.lost for r in recs) for s in ("COMPLETE", "PRUNED", "FAIL")}
    counts["lost"] = sum(t.state == TrialState.FAIL and (t.user_attrs.get("lost") or "record" not in t.user_attrs)
                         for t in study.get_trials(deepcopy=False))
    chosen_variant = chosen_path = export = None
    if chosen is not None:
        chosen_variant = chosen.variant.model_copy(update={"name": f"{spec.run_name}-trial{chosen.number}"})
        write_text(rd.chosen, dump_yaml(chosen_variant))
        chosen_path = str(rd.chosen)
        export = f"greenopt export {rd.root} --pick best --out {rd.root / 'export'}"
    elif rd.chosen.exists():
        rd.chosen.unlink()
    result = SearchResult(
        run_dir=str(rd.root), study_name=study.study_name, storage=study_storage.redact(storage_url),
        target=spec.target, scheme=scheme.name, metric=scheme.metric, max_drop=spec.max_drop,
        objectives=study_storage.objective_names(scheme),
        n_trials=spec.n_trials, counts=counts, baseline=next((r for r in rows if r.is_baseline), None),
        front=tuple(sorted((r for r in rows if r.on_front), key=lambda r: -r.mean_accuracy)), trials=rows,
        chosen=next((r for r in rows if r.chosen), None),
        chosen_variant=chosen_variant,
        chosen_path=chosen_path, export_command=export,
        unreachable=None if chosen else pareto.unreachable([r.confirmed_view() for r in recs], target),
        finalists=rungs.finalist_tests(recs, chosen),
        interrupted=interrupted, stop_reason=study.user_attrs.get(STOP_REASON_ATTR),
        estimated=any(r.estimated for r in rows), duration_s=duration_s,
    )
    try:

        result = result.model_copy(update={"plots": plot.write_plots(result, scheme, rd.root)})
    except Exception as e:  # noqa: BLE001 - a plot must never lose the search result
        log.warning("could not draw the Pareto plot: %s", e)
    return result
