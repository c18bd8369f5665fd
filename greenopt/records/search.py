"""Frozen outputs of a search: the quick look and full outcome of a trial, its stored record,
the rows of the front, the unreachable report and the search result."""

from __future__ import annotations

import math
from typing import Any, Literal

from greenopt.config import LabelScheme, Variant
from greenopt.records._base import Record
from greenopt.records.label import Grade
from greenopt.records.measure import ApplyReport, Comparison, EvalResult, PairedDifference


class Goal(Record):
    """What a search must reach: a class of one label scheme (the worse end of each interval
    counts) and, optionally, an accuracy budget. Built once per search by
    :func:`greenopt.label.goal` and passed on; ``bound`` is the class's upper bound in the
    scheme's metric (inf for the open last class)."""

    scheme: LabelScheme
    letter: str
    max_drop: float | None = None

    @property
    def bound(self) -> float:
        c = next(c for c in self.scheme.classes if c.letter == self.letter)
        return math.inf if c.max is None else float(c.max)

    @property
    def unit(self) -> str:
        return "EEI" if self.scheme.relative else "J/token"


class QuickLook(Record):
    """The cheap first look: KL from the baseline and held-aside perplexity, optionally a short
    energy comparison."""

    kl_nats_per_token: float | None = None
    perplexity: float | None = None
    baseline_perplexity: float | None = None
    comparison: Comparison | None = None

    @property
    def perplexity_ratio(self) -> float | None:
        if self.perplexity is None or not self.baseline_perplexity:
            return None
        return self.perplexity / self.baseline_perplexity


class RungScore(Record):
    """Accuracy of one model on one rung of the ladder, paired against the baseline on the same items.

    ``limit`` is the items per task (None: the full sets), ``n`` the items scored over all tasks.
    ``paired`` is the mean-accuracy difference from the baseline with its paired standard error
    (None when no task has per-item values, e.g. perplexity only).
    """

    limit: int | None
    n: int
    mean_accuracy: float
    baseline_accuracy: float
    paired: PairedDifference | None = None

    @property
    def delta(self) -> float:
        """Mean accuracy minus the baseline's on the same items (negative = a loss)."""
        return self.paired.diff if self.paired is not None else self.mean_accuracy - self.baseline_accuracy


class FinalistTest(Record):
    """Two finalists compared on the same items: ``a`` minus ``b`` in mean accuracy, paired."""

    a: int
    b: int
    limit: int | None
    paired: PairedDifference

    @property
    def line(self) -> str:
        """E.g. ``trial 12 vs trial 7: +1.2 points, paired SE 0.5, z 2.3 (2408 items)``."""
        p = self.paired
        z = f"{p.z:.1f}" if math.isfinite(p.z) else ("inf" if p.z > 0 else "-inf")
        return (f"trial {self.a} vs trial {self.b}: {100 * p.diff:+.1f} points, paired SE {100 * p.stderr:.1f}, "
                f"z {z} ({p.n} items)")


class RunOutcome(Record):
    """What one trial measured. ``pruned`` is the cut's reason when the trial stopped early.

    ``eval`` is the score on the trial's largest item set; ``rungs`` the ladder it climbed.
    """

    apply: ApplyReport | None = None
    quick: QuickLook | None = None
    pruned: str | None = None
    eval: EvalResult | None = None
    rungs: tuple[RungScore, ...] = ()
    comparison: Comparison | None = None
    durations_s: dict[str, float] = {}


State = Literal["COMPLETE", "PRUNED", "FAIL"]


class TrialRecord(Record):
    """One search trial as stored in the study (user attr ``record``) and in ``trials/NNNNN.json``.

    ``energy`` and ``energy_ci`` are the minimised objective in the scheme's metric (EEI, or
    J/token); ``constraint`` holds the values given to the sampler (<= 0 is feasible).
    ``lost`` trials (Ctrl-C, a dead worker) do not count against the budget.
    """

    number: int
    state: State
    variant: Variant
    variant_hash: str
    params: dict[str, Any] = {}
    is_baseline: bool = False
    reason: str | None = None
    traceback: str | None = None
    lost: bool = False
    cached_from: int | None = None
    apply: ApplyReport | None = None
    quick: QuickLook | None = None
    eval: EvalResult | None = None
    baseline_accuracy: float | None = None
    comparison: Comparison | None = None
    grade: Grade | None = None
    energy: float | None = None
    energy_ci: tuple[float, float] | None = None
    constraint: tuple[float, ...] = ()
    device: str = ""
    worker: str = ""
    started: str = ""
    duration_s: float = 0.0
    durations_s: dict[str, float] = {}
    # After the budget the search re-measures its pick and runner-ups with fresh comparisons;
    # these are the confirmed figures (the search-time ones above stay as they were read).
    confirmed: Comparison | None = None
    confirmed_grade: Grade | None = None
    # The accuracy ladder: rungs[k] is the score on the k-th item set (eval is the last one,
    # baseline_accuracy the baseline's on the same items); final is the finalists' scoring after
    # the budget (final_eval its per-task scores).
    rungs: tuple[RungScore, ...] = ()
    final: RungScore | None = None
    final_eval: EvalResult | None = None

    def confirmed_view(self) -> TrialRecord:
        """This record with its after-the-budget figures (confirmed energy, final accuracy) in place
        of the search-time ones (itself when it has none)."""
        update: dict[str, Any] = {}
        if self.confirmed is not None and self.confirmed_grade is not None:
            c, g = self.confirmed, self.confirmed_grade
            relative = g.metric == "eei"
            update = {"comparison": c, "grade": g, "energy": c.eei if relative else c.candidate.joules_per_token,
                      "energy_ci": c.eei_ci if relative else c.candidate.joules_per_token_ci}
        if self.final is not None and self.final_eval is not None:
            update.update(eval=self.final_eval, baseline_accuracy=self.final.baseline_accuracy,
                          rungs=(*self.rungs, self.final))
        return self.model_copy(update=update) if update else self

    @property
    def accuracy_delta(self) -> float | None:
        """Mean accuracy minus the baseline's on the same items (paired; negative = a loss)."""
        if self.rungs:
            return self.rungs[-1].delta
        drop = self.accuracy_drop
        return None if drop is None else -drop

    @property
    def search_accuracy(self) -> float | None:
        """Mean accuracy on the first rung's scale: the baseline's first-rung accuracy plus this trial's
        paired difference on its largest item set. What the sampler is told and the front is drawn on,
        so trials scored on different item sets compare fairly; the plain mean for unladdered records."""
        if not self.rungs or self.mean_accuracy is None:
            return self.mean_accuracy
        return self.rungs[0].baseline_accuracy + self.rungs[-1].delta

    @property
    def mean_accuracy(self) -> float | None:
        return self.eval.mean_accuracy if self.eval is not None else None

    @property
    def accuracy_drop(self) -> float | None:
        """Baseline mean accuracy minus this trial's (positive = a loss)."""
        if self.mean_accuracy is None or self.baseline_accuracy is None:
            return None
        return self.baseline_accuracy - self.mean_accuracy

    @property
    def energy_worst(self) -> float | None:
        """The worse (higher) end of the energy figure: the one a label must count."""
        if self.energy is None:
            return None
        return max(self.energy, self.energy_ci[1]) if self.energy_ci else self.energy

    @property
    def measured(self) -> bool:
        """COMPLETE with a finite accuracy and energy: eligible for the front."""
        acc = self.mean_accuracy
        return (self.state == "COMPLETE" and acc is not None and math.isfinite(acc)
                and self.energy is not None and math.isfinite(self.energy))


class ClosestRow(Record):
    """A near miss: where it landed and what kept it from the target."""

    number: int
    variant_hash: str
    display: str
    energy: float
    energy_worst: float
    accuracy_drop: float | None
    limited_by: str


class Unreachable(Record):
    """The honest report when no trial reached the target."""

    message: str
    closest: tuple[ClosestRow, ...]
    counts: dict[str, int]
    prune_reasons: dict[str, int]
    fail_reasons: dict[str, int]


class FrontRow(Record):
    """One measured trial as the front table and the plot show it."""

    number: int
    variant_hash: str
    steps: str
    is_baseline: bool
    chosen: bool
    on_front: bool
    accuracy: dict[str, float]
    mean_accuracy: float
    accuracy_drop: float | None
    energy: float
    energy_ci: tuple[float, float]
    joules_per_token: float
    joules_per_token_ci: tuple[float, float]
    tier: str
    eei: float
    eei_ci: tuple[float, float]
    display: str
    worst_letter: str
    estimated: bool
    weight_bytes: int | None
    tokens_per_s: float
    confirmed: bool = False  # figures from the confirmation's fresh comparisons, not the search's one
    search_energy: float | None = None  # the search-time figure, shown beside a confirmed one
    search_display: str | None = None
    items_per_task: int | None = None  # the item set the accuracy is on (None: full sets)
    accuracy_drop_se: float | None = None  # paired standard error of accuracy_drop


class SearchResult(Record):
    """What a search found: the front, the chosen variant, or the honest unreachable report."""

    run_dir: str
    study_name: str
    storage: str
    target: str
    scheme: str
    metric: str
    max_drop: float | None
    objectives: tuple[str, str]
    n_trials: int
    counts: dict[str, int]
    baseline: FrontRow | None
    front: tuple[FrontRow, ...]
    trials: tuple[FrontRow, ...]
    chosen: FrontRow | None
    chosen_variant: Variant | None = None
    chosen_path: str | None = None
    export_command: str | None = None
    unreachable: Unreachable | None = None
    interrupted: bool = False
    stop_reason: str | None = None  # what ended the run: budget, time limit, Ctrl-C, repeated failures
    estimated: bool = False
    duration_s: float = 0.0
    confirm_s: float = 0.0  # of duration_s: re-measuring the pick and runner-ups after the budget
    finalists: tuple[FinalistTest, ...] = ()  # the chosen trial against each other finalist, paired
    final_s: float = 0.0  # of duration_s: scoring the finalists and the baseline on the final item set
    plots: dict[str, str] = {}
