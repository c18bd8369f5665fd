"""Successive halving of accuracy items across a search's trials, and the finalists' scoring.

Every trial that passes the quick look is scored on the first rung (``fidelity.eval.limit``
seeded items per task). It climbs to the next rung (more items, the earlier ones included)
when it ranks in the top ``1/promote_eta`` of the trials already scored on that rung that could
reach the target (the best end of their energy interval inside the target class), by paired
accuracy against the baseline: asynchronous successive halving (ASHA, Li et al. 2018), judged
only among trials that could be picked. After the budget the finalists (the confirmed trials)
and the baseline are scored on ``fidelity.final_limit`` items (None: the full sets), and the
choice is printed with a paired test against each other finalist.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import optuna

from greenopt._io import write_json
from greenopt.config import SearchSpec
from greenopt.evaluate.paired import paired_accuracy, rung_score
from greenopt.label import Goal
from greenopt.records import Comparison, FinalistTest, RungScore, TrialRecord
import greenopt.search.confirm as confirm
import greenopt.search.rundir as rundir
import greenopt.search.storage as study_storage
from greenopt.search.failures import attempt
from greenopt.search.runner import Progress, TrialRunner

log = logging.getLogger(__name__)


def promote(records: Sequence[TrialRecord], rung: int, score: RungScore, comparison: Comparison, goal: Goal,
            eta: int) -> bool:
    """Whether a trial just scored on ``rung`` climbs to the next one.

    Args:
        records: the study's records so far (the trial itself not among them).
        rung: the index of the rung the trial was scored on.
        score: its paired score there.
        comparison: its energy comparison (the best end of the interval must reach the goal's class).
        goal: the search's target class and accuracy budget.
        eta: the halving factor: the top ``ceil(n / eta)`` of the ``n`` eligible trials on the rung climb.

    Returns:
        True to score it on the next rung.
    """
    if not _could_reach(_best_end(comparison, goal), goal) or _clearly_over_budget(score, goal):
        return False
    peers = [r.rungs[rung].delta for r in records
             if r.measured and not r.is_baseline and len(r.rungs) > rung and r.energy_ci is not None
             and _could_reach(r.energy_ci[0], goal)]
    rank = sum(d > score.delta for d in peers)
    return rank < math.ceil((len(peers) + 1) / eta)


def score_finalists(study: optuna.Study, spec: SearchSpec, target: Goal, runner: TrialRunner, rd: rundir.RunDir,
                    progress: Progress | None) -> float:
    """Scores the finalists and the baseline on the final item set; returns the seconds it took.

    The finalists are the confirmed trials (or, with confirmation off, the trials confirmation
    would take). Already scored finalists (a resumed run) are not scored again; an expected
    failure leaves that finalist on its search-time accuracy and goes on.
    """
    fid = spec.fidelity
    if not fid.final_scoring:
        return 0.0
    t0 = time.monotonic()
    recs = study_storage.records(study)
    finalists = [r for r in recs if r.confirmed is not None] or confirm.to_confirm(recs, target,
                                                                                   max(2, spec.confirm_top))
    baseline = [r for r in recs if r.is_baseline and r.measured]
    todo = [r for r in finalists if r.final is None or r.final.limit != fid.final_limit]
    if not todo and all(r.final is not None and r.final.limit == fid.final_limit for r in baseline):
        return 0.0
    base = runner.baseline_score(fid.final_limit, progress=progress)
    for rec in baseline:  # the table then shows the baseline on the finalists' items too
        study_storage.save_final(study, rec.number, rung_score(base, base), base)
        write_json(rd.trial_path(rec.number), rec.model_copy(update={"final": rung_score(base, base),
                                                                    "final_eval": base}))
    for i, rec in enumerate(todo):
        if progress:
            progress("final accuracy", i, len(todo))
        ev = attempt(f"score finalist trial {rec.number}",
                     lambda rec=rec: runner.score(rec.variant, fid.final_limit, progress=progress))
        if ev is None:
            continue
        score = rung_score(ev, base)
        study_storage.save_final(study, rec.number, score, ev)
        write_json(rd.trial_path(rec.number), rec.model_copy(update={"final": score, "final_eval": ev}))
        log.info("finalist trial %d: %+.1f points on %d items (search read %+.1f on %d)", rec.number,
                 100 * score.delta, score.n, 100 * (rec.accuracy_delta or 0.0), rec.rungs[-1].n if rec.rungs else 0)
    if progress:
        progress("final accuracy", len(todo), len(todo))
    return time.monotonic() - t0


def finalist_tests(records: Sequence[TrialRecord], chosen: TrialRecord | None) -> tuple[FinalistTest, ...]:
    """The chosen trial against every other finalist scored on the same final items, paired."""
    if chosen is None or chosen.final_eval is None:
        return ()
    out = []
    for r in records:
        if r.number == chosen.number or r.is_baseline or r.final_eval is None \
                or r.final_eval.limit != chosen.final_eval.limit:
            continue
        paired = paired_accuracy(chosen.final_eval, r.final_eval)
        if paired is not None:
            out.append(FinalistTest(a=chosen.number, b=r.number, limit=chosen.final_eval.limit, paired=paired))
    return tuple(out)


def _best_end(comparison: Comparison, goal: Goal) -> float:
    return comparison.eei_ci[0] if goal.scheme.relative else comparison.candidate.joules_per_token_ci[0]


def _could_reach(best_end: float, goal: Goal) -> bool:
    return best_end <= goal.bound


def _clearly_over_budget(score: RungScore, goal: Goal) -> bool:
    """The drop exceeds ``max_drop`` by more than three paired standard errors: more items won't save it."""
    if goal.max_drop is None:
        return False
    se = score.paired.stderr if score.paired is not None else 0.0
    return -score.delta - 3 * se > goal.max_drop
