"""Paired accuracy over tasks: one model against another on the same seeded items.

Every trial of a search and the baseline are scored on the same nested, seeded item subsets
(:func:`greenopt.evaluate.seeded_subset`), so two models are compared item by item: the
per-task paired differences (:func:`~greenopt.evaluate.fidelity.paired_difference`) averaged
over tasks, with the standard error of that mean (tasks are independent item sets).

Example:
    >>> from greenopt.records import EvalResult, TaskScore
    >>> a = EvalResult(scores=(TaskScore(task="t", metric="acc", value=0.75, n=4, items=(1, 1, 1, 0)),),
    ...                limit=4, seed=0)
    >>> b = EvalResult(scores=(TaskScore(task="t", metric="acc", value=0.5, n=4, items=(1, 1, 0, 0)),),
    ...                limit=4, seed=0)
    >>> round(rung_score(a, b).delta, 2)
    0.25
"""

from __future__ import annotations

import math

from greenopt.errors import ConfigError
from greenopt.evaluate.fidelity import paired_difference
from greenopt.records import EvalResult, PairedDifference, RungScore

__all__ = ["paired_accuracy", "rung_score"]


def paired_accuracy(candidate: EvalResult, baseline: EvalResult) -> PairedDifference | None:
    """Mean accuracy of ``candidate`` minus ``baseline``'s over the same items, paired per task.

    The difference is the mean over the higher-is-better tasks of each task's paired
    difference; its standard error is ``sqrt(sum se_t^2) / T``.

    Returns:
        The difference, or None when a higher-is-better task lacks per-item values (score with
        ``keep_items=True``) or has fewer than 2 items.

    Raises:
        ConfigError: the two results are on different tasks or item sets.
    """
    cand = {s.task: s for s in candidate.scores if s.higher_is_better}
    base = {s.task: s for s in baseline.scores if s.higher_is_better}
    if set(cand) != set(base):
        raise ConfigError(f"paired accuracy: tasks {sorted(cand)} against {sorted(base)}; score both on the same tasks")
    if candidate.limit != baseline.limit or candidate.seed != baseline.seed:
        raise ConfigError(f"paired accuracy: items (limit {candidate.limit}, seed {candidate.seed}) against "
                          f"(limit {baseline.limit}, seed {baseline.seed}); score both on the same items")
    if not cand or any(s.items is None or len(s.items) < 2 for s in (*cand.values(), *base.values())):
        return None
    per_task = [paired_difference(cand[t].items, base[t].items) for t in sorted(cand)]
    diff = math.fsum(p.diff for p in per_task) / len(per_task)
    stderr = math.sqrt(math.fsum(p.stderr ** 2 for p in per_task)) / len(per_task)
    z = diff / stderr if stderr > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return PairedDifference(diff=diff, stderr=stderr, z=z, n=sum(p.n for p in per_task))


def rung_score(candidate: EvalResult, baseline: EvalResult) -> RungScore:
    """``candidate`` on one rung (its item set), paired against ``baseline`` on the same items."""
    return RungScore(limit=candidate.limit, n=sum(s.n for s in candidate.scores if s.higher_is_better),
                     mean_accuracy=candidate.mean_accuracy, baseline_accuracy=baseline.mean_accuracy,
                     paired=paired_accuracy(candidate, baseline))
