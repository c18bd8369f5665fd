"""Frozen outputs: device facts, energy measurements, evaluation results, move reports.

Units are in field names (``energy_j``, ``duration_s``, ``power_w``). Every energy figure
carries its tier (``M1`` counter, ``M2`` sampled power, ``E1`` estimate), the device and
measurement boundary, and the protocol id, so nothing greenopt prints is unattributed.
"""

from __future__ import annotations

from typing import Literal

from greenopt.config.protocol import TIER_ORDER, Tier
from greenopt.records._base import Record


class DeviceInfo(Record):
    """What was measured and where the measurement boundary lies."""

    kind: Literal["cuda", "cpu"]
    name: str
    meter: str  # "nvml", "nvml-sampled", "rapl", "rapl-zeusd", "hwmon", "estimate", "fake"
    boundary: str  # e.g. "GPU board (NVML)", "CPU package + DRAM (RAPL)"
    driver: str | None = None
    power_limit_w: float | None = None
    notes: tuple[str, ...] = ()


class WindowResult(Record):
    """Energy over one meter window."""

    energy_j: float
    duration_s: float
    tier: Tier
    flags: tuple[str, ...] = ()  # e.g. "short-window", "counter-not-monotonic"


class TrialFigures(Record):
    """One protocol trial: a run of prompts until the trial's minimum time and tokens."""

    energy_j: float
    duration_s: float
    generated_tokens: int
    prompt_tokens: int

    @property
    def joules_per_token(self) -> float:
        return self.energy_j / self.generated_tokens


class EnergyMeasurement(Record):
    """Protocol GO-1 figures for one model on one device. Statistic: median over trials.

    ``tier`` is the effective tier after validity checks (a failed check downgrades it one
    step; ``flags`` says which check failed).
    """

    joules_per_token: float
    joules_per_token_ci: tuple[float, float]
    trials: tuple[TrialFigures, ...]
    decode_joules_per_token: float | None = None
    prefill_joules_per_prompt_token: float | None = None
    tokens_per_s: float
    mean_power_w: float
    idle_power_w: float | None = None
    cv: float
    tier: Tier
    source_tier: Tier
    device: DeviceInfo
    protocol_id: str
    flags: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return not self.flags


class Comparison(Record):
    """A candidate measured against its baseline (trials A B A B ...), once or repeated.

    EEI = 100 x E_tok(candidate) / E_tok(baseline). ``interval`` says what ``eei_ci`` holds:
    ``in-run``, a paired bootstrap within one comparison (it misses what differs between runs);
    ``repeated``, ``runs`` lists R independent comparisons' EEIs and the interval combines their
    spread, the in-run term and the machine's noise floor; ``floored``, one comparison whose
    in-run interval is widened by the noise floor. ``floor_log_sd`` is that floor (sd of log EEI
    between comparisons, 0: none applied) and ``floor_source`` says where it came from (a
    ``greenopt calibrate`` run, or the stated default for an uncalibrated estimate). ``first`` is
    the side that went first (of the comparison shown, for repeated ones) and ``order_seed`` the
    seed of its side and prompt order.
    """

    eei: float
    eei_ci: tuple[float, float]
    baseline: EnergyMeasurement
    candidate: EnergyMeasurement
    interval: Literal["in-run", "repeated", "floored"] = "in-run"
    runs: tuple[float, ...] = ()
    floor_log_sd: float = 0.0
    floor_source: str | None = None
    first: Literal["baseline", "candidate"] | None = None
    order_seed: int | None = None

    @property
    def interval_note(self) -> str:
        """How the interval was obtained, for every place that prints it."""
        if self.interval == "in-run":
            return "in-run interval (one comparison; the spread between runs is not in it)"
        floor = (f"noise floor sd {self.floor_log_sd:.3f} log EEI ({self.floor_source or 'source not recorded'})"
                 if self.floor_log_sd else "no noise floor (not calibrated: run greenopt calibrate)")
        if self.interval == "floored":
            return f"one comparison, in-run interval widened by the {floor}"
        return f"interval over {len(self.runs)} comparisons, {floor}"

    @property
    def tier(self) -> Tier:
        """The worse of the two tiers: a ratio is only as good as its weaker side."""
        return max(self.baseline.tier, self.candidate.tier, key=TIER_ORDER.index)


class TaskScore(Record):
    """Accuracy (or perplexity) on one task. ``higher_is_better`` tells how to compare."""

    task: str
    metric: str
    value: float
    stderr: float | None = None
    n: int
    higher_is_better: bool = True
    items: tuple[float, ...] | None = None  # per-item values ordered by doc id, when kept (evaluate(keep_items=True))


class EvalResult(Record):
    """lm-eval results for one model: one score per task, with the subset used.

    ``cached``: the scores were read back from the baseline cache
    (:func:`greenopt.evaluate.cache.baseline_eval`), not computed in this call.
    """

    scores: tuple[TaskScore, ...]
    limit: int | None
    seed: int
    cached: bool = False

    def score(self, task: str) -> TaskScore:
        for s in self.scores:
            if s.task == task:
                return s
        raise KeyError(task)

    @property
    def mean_accuracy(self) -> float:
        """Mean over higher-is-better scores (perplexities excluded)."""
        acc = [s.value for s in self.scores if s.higher_is_better]
        return sum(acc) / len(acc) if acc else float("nan")


class StepReport(Record):
    """What one compression step really changed."""

    kind: str
    summary: str
    modules: int
    params_before: int
    params_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    fast_kernel: bool | None = None  # None: not applicable
    notes: tuple[str, ...] = ()


class ApplyReport(Record):
    """What a whole variant changed, for the card and the search table."""

    variant_hash: str
    steps: tuple[StepReport, ...]
    params_before: int
    params_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    bits_per_layer: dict[str, float]
    sparsity: float
    flops_per_token_before: int
    flops_per_token_after: int
    fast_kernel: bool | None


class NoiseFloor(Record):
    """The between-comparison spread of A/A comparisons on one machine (``greenopt calibrate``).

    ``eeis`` are the K A/A comparisons' EEIs (the baseline against a fresh copy of itself, each
    in its own process); ``log_sd`` is their sample sd of log EEI (ddof=1), the floor that
    widens intervals measured under the same ``key`` (machine, meter, protocol, threads).
    """

    version: Literal[1] = 1
    key: str
    machine: str
    cpu_flags: tuple[str, ...]
    meter: str
    tier: Tier
    protocol_id: str
    threads: int
    model_id: str
    eeis: tuple[float, ...]
    in_run_intervals: tuple[tuple[float, float], ...]
    log_sd: float
    created: str
    wall_s: float

    @property
    def source(self) -> str:
        return f"calibrated {self.created[:10]}, {len(self.eeis)} A/A comparisons"


class KLLook(Record):
    """The KL fidelity look: a variant's next-token distribution against the baseline's.

    ``kl_nats_per_token`` is the mean over ``tokens`` positions of KL(baseline || candidate)
    on the coarsened distribution (the baseline's ``top_k`` tokens plus one bucket pooling the
    rest of each side's mass): a lower bound of the full-vocabulary KL, close to it when the
    top-k hold most of the mass. ``window_kl_max_nats_per_token`` is the worst window's mean,
    ``position_kl_p99_nats`` the 99th percentile over positions. ``reference_key`` names the
    cached baseline reference it was scored against.
    """

    kl_nats_per_token: float
    window_kl_max_nats_per_token: float
    position_kl_p99_nats: float
    tokens: int
    windows: int
    top_k: int
    duration_s: float
    reference_key: str


class PairedDifference(Record):
    """Candidate minus baseline over the same ``n`` items, with the paired standard error.

    ``stderr`` is sd(d_i) / sqrt(n) over the per-item differences d_i (sample sd, ddof=1);
    ``z = diff / stderr`` (0 when both are 0, +-inf when only the spread is 0).
    """

    diff: float
    stderr: float
    z: float
    n: int
