"""Frozen outputs of grading and labelling: the grade of one figure and the label card."""

from __future__ import annotations

from typing import Literal

from greenopt.config.label import LabelScheme, Metric
from greenopt.config.protocol import Tier
from greenopt.records._base import Record
from greenopt.records.measure import DeviceInfo


class Grade(Record):
    """A value placed on a scheme, with its interval, tier and the text to print.

    ``letter`` is the class of the point value; ``letter_range`` holds the letters of the
    interval ends (one entry when both ends share a class); ``worst_letter`` is the worse
    end's class. ``estimated`` grades (tier E1) never print a plain letter.
    """

    scheme: str
    scheme_version: int
    metric: Metric
    value: float
    interval: tuple[float, float]
    letter: str
    letter_range: tuple[str, ...]
    worst_letter: str
    tier: Tier
    estimated: bool
    display: str


class VariantInfo(Record):
    """The variant on the label: name, step hash and what its steps changed."""

    name: str
    hash: str
    steps: tuple[str, ...] = ()
    params_before: int | None = None
    params_after: int | None = None
    weight_bytes_before: int | None = None
    weight_bytes_after: int | None = None


class EnergySummary(Record):
    """GO-1 figures of one model, as printed on the card (J, W, s)."""

    joules_per_token: float
    joules_per_token_ci: tuple[float, float]
    decode_joules_per_token: float | None
    prefill_joules_per_prompt_token: float | None
    tokens_per_s: float
    mean_power_w: float
    idle_power_w: float | None
    tier: Tier
    source_tier: Tier
    trials: int
    cv: float
    flags: tuple[str, ...] = ()


class RuntimeDescription(Record):
    """What a runtime says about itself (:meth:`greenopt.runtimes.Runtime.describe`).

    ``kernels`` names the compute paths its weights take (e.g. ``torch.matmul bfloat16``,
    ``MatMulNBits int4 acc4``); ``options`` its settings (block size, accuracy level, compiled).
    """

    name: str
    version: str
    dtype: str
    device: str
    threads: int | None = None
    kernels: tuple[str, ...] = ()
    options: dict[str, str] = {}
    libraries: dict[str, str] = {}

    def line(self) -> str:
        """``onnxruntime-genai 0.18.0, float32 on cpu, 2 threads: MatMulNBits int4 acc4``."""
        where = f"{self.dtype} on {self.device}" + (f", {self.threads} threads" if self.threads else "")
        kernels = f": {', '.join(self.kernels)}" if self.kernels else ""
        return f"{self.name} {self.version}, {where}{kernels}"


class KernelTiming(Record):
    """One compute path of the kernel probe: seconds per batch-1 call and its ratio to fp32 in the
    same run (None with a ``note`` when the path does not exist here); ``fast``: ratio <= the cut."""

    name: str
    seconds_per_call: float | None
    ratio_to_fp32: float | None
    fast: bool
    note: str | None = None


class KernelProbe(Record):
    """What :func:`greenopt.runtimes.probe.probe_kernels` found on this machine."""

    cpu_flags: tuple[str, ...]
    threads: int
    shape: tuple[int, int]  # (in_features, out_features) of the probed weight
    timings: tuple[KernelTiming, ...]
    duration_s: float

    def lines(self) -> list[str]:
        """One line per path: ``bfloat16 matmul  0.29x fp32  fast``."""
        out = []
        for t in self.timings:
            if t.ratio_to_fp32 is None:
                out.append(f"{t.name}: not available ({t.note})")
            else:
                out.append(f"{t.name}: {t.ratio_to_fp32:.2f}x fp32's time" + (" (fast)" if t.fast else ""))
        return out


class RuntimeInfo(Record):
    """The runtime the figures hold for: library versions, attention, dtype and workload.

    ``deployed``/``baseline`` describe the runtimes the candidate and the baseline ran on
    (None on cards written before runtimes were recorded: transformers for both).
    """

    torch: str
    transformers: str
    attention: str
    dtype: str
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    libraries: dict[str, str] = {}
    deployed: RuntimeDescription | None = None
    baseline: RuntimeDescription | None = None


class TaskLine(Record):
    """Accuracy on one task beside the baseline; ``drop`` > 0 means the variant is worse."""

    task: str
    metric: str
    value: float
    baseline: float
    drop: float
    higher_is_better: bool
    n: int
    stderr: float | None = None


class CarbonLine(Record):
    """gCO2e per 1000 generated tokens of the variant at the stated grid intensity."""

    g_per_1k_tokens: float
    intensity_g_per_kwh: float
    estimated: bool


class LabelCard(Record):
    """Everything a label states; JSON round-trips through :func:`load_card`."""

    card_version: Literal[1] = 1
    model_id: str
    variant: VariantInfo
    relative: Grade
    relative_scheme: LabelScheme
    absolute: Grade | None
    absolute_scheme: LabelScheme | None
    absolute_note: str | None
    candidate: EnergySummary
    baseline: EnergySummary
    tier: Tier
    device: DeviceInfo
    runtime: RuntimeInfo
    protocol_id: str
    interval_note: str = "in-run interval (one comparison; the spread between runs is not in it)"
    eei_runs: tuple[float, ...] = ()  # each comparison's EEI when the figure repeats R comparisons
    accuracy: tuple[TaskLine, ...]
    eval_limit: int | None
    eval_seed: int
    carbon: CarbonLine
    date: str
    greenopt_version: str

    @property
    def estimated(self) -> bool:
        """True when the label's letter comes from an E1 estimate (never a plain letter)."""
        return self.relative.estimated

    @property
    def flags(self) -> tuple[str, ...]:
        """Failed validity checks of either measurement (empty: all checks passed)."""
        return tuple(dict.fromkeys(self.candidate.flags + self.baseline.flags))
