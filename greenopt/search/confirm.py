"""After the budget: re-measure the search's pick and runner-ups with fresh repeated comparisons.

The search reads each trial once (one comparison, an in-run interval); the reported class and
the choice come from these confirmed figures (``TrialRecord.confirmed``), stored in the study.
"""

from __future__ import annotations

import logging
import math
import time

import optuna

from greenopt._io import write_json
from greenopt.config import SearchSpec
from greenopt.label import Goal, grade_comparison, grade_measurement
from greenopt.records import TrialRecord
import greenopt.search.pareto as pareto
import greenopt.search.rundir as rundir
import greenopt.search.storage as study_storage
from greenopt.search.failures import attempt
from greenopt.search.runner import Progress, TrialRunner

log = logging.getLogger(__name__)


def confirm(study: optuna.Study, spec: SearchSpec, target: Goal, runner: TrialRunner, rd: rundir.RunDir,
             progress: Progress | None) -> float:
    """Re-measures the pick and its runner-ups with fresh repeated comparisons; returns the seconds it took.

    The search's own figure is one comparison (an in-run interval); the reported class and the
    choice come from these. Already confirmed trials (a resumed run) are not measured again.
    An expected failure leaves that trial unconfirmed (so it cannot be chosen) and goes on.
    """
    if spec.confirm_top == 0:
        return 0.0
    t0 = time.monotonic()
    todo = to_confirm(study_storage.records(study), target, spec.confirm_top)
    for i, rec in enumerate(todo):
        if rec.confirmed is not None and len(rec.confirmed.runs) == spec.confirm_comparisons:
            continue
        if progress:
            progress("confirm", i, len(todo))
        cmp = attempt(f"confirm trial {rec.number}",
                      lambda rec=rec: runner.confirm(rec.variant, spec.confirm_comparisons, progress=progress))
        if cmp is None:
            continue
        grade = (grade_comparison(cmp, target.scheme) if target.scheme.relative
                 else grade_measurement(cmp.candidate, target.scheme))
        study_storage.save_confirmation(study, rec.number, cmp, grade)
        write_json(rd.trial_path(rec.number), rec.model_copy(update={"confirmed": cmp, "confirmed_grade": grade}))
        log.info("confirmed trial %d: %s (search read %s)", rec.number, grade.display,
                 rec.grade.display if rec.grade else "?")
    if progress:
        progress("confirm", len(todo), len(todo))
    took = time.monotonic() - t0
    log.info("confirmation of %d trials x %d comparisons took %.0f s", len(todo), spec.confirm_comparisons, took)
    return took


def to_confirm(recs: list[TrialRecord], target: Goal, k: int) -> list[TrialRecord]:
    """The best ``k`` trials that reached the goal at search time (least accuracy loss first),
    topped up with the closest that did not (lowest worse end of the energy interval)."""
    measured = [r for r in recs if r.measured and not r.is_baseline]
    ok = sorted((r for r in measured if pareto.feasible(r, target)),
                key=lambda r: (r.accuracy_drop if r.accuracy_drop is not None else math.inf, r.energy, r.number))
    near = sorted((r for r in measured if not pareto.feasible(r, target)), key=lambda r: (r.energy_worst, r.number))
    return (ok + near)[:k]
