"""Validated inputs: energy protocol, evaluation spec, variant steps.

Every input is a frozen pydantic model with ``extra="forbid"``, so a typo in a recipe or a
variant file fails loudly with its field path. Inputs carry a ``version`` and round-trip
through YAML/JSON unchanged.

Example:
    >>> from greenopt.config import Variant, QuantizeStep, Target
    >>> v = Variant(steps=[QuantizeStep(method="hqq", bits=4, group_size=64,
    ...                                  target=Target(include=["*mlp*"]))])
    >>> len(v.hash)
    12
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from greenopt.errors import ConfigError


class Strict(BaseModel):
    """Base for every input: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- protocol


class Protocol(Strict):
    """Energy protocol GO-1 (shared/ENERGY.md §2). Lengths are in tokens, durations in s."""

    version: Literal[1] = 1
    preset: str = "go1"
    batch_size: int = Field(1, ge=1)
    prompt_tokens: int = Field(256, ge=1)
    new_tokens: int = Field(256, ge=1)
    warmup_generations: int = Field(3, ge=0)
    warmup_min_s: float = Field(3.0, ge=0)
    trials: int = Field(5, ge=1)
    trial_min_s: float = Field(10.0, ge=0)
    trial_min_tokens: int = Field(512, ge=1)
    cv_max: float = Field(0.05, gt=0)
    bootstrap_resamples: int = Field(2000, ge=100)
    seed: int = 0

    @property
    def id(self) -> str:
        """Protocol id, e.g. ``GO-1/b1`` or ``GO-1/b1/p64-n32`` for a smaller preset."""
        base = f"GO-{self.version}/b{self.batch_size}"
        if (self.prompt_tokens, self.new_tokens) != (256, 256):
            base += f"/p{self.prompt_tokens}-n{self.new_tokens}"
        return base


PROTOCOL_PRESETS: dict[str, Protocol] = {
    # The spec's protocol: 256 prompt + 256 new tokens, 5 trials of >= 10 s and 512 tokens.
    "go1": Protocol(),
    # CPU-sized: a 135M model on 2 cores finishes a baseline+candidate pair in a few minutes.
    "cpu": Protocol(preset="cpu", prompt_tokens=64, new_tokens=32, warmup_generations=3,
                    warmup_min_s=2.0, trials=5, trial_min_s=3.0, trial_min_tokens=64),
    # Search fidelity 0: a cheap first look used to prune hopeless trials.
    "quick": Protocol(preset="quick", prompt_tokens=32, new_tokens=16, warmup_generations=1,
                      warmup_min_s=0.5, trials=5, trial_min_s=1.0, trial_min_tokens=32),
    # Tests only: tiny models, no minimum duration.
    "smoke": Protocol(preset="smoke", prompt_tokens=8, new_tokens=4, warmup_generations=1,
                      warmup_min_s=0.0, trials=5, trial_min_s=0.0, trial_min_tokens=4),
}


def protocol_preset(name: str, **overrides: Any) -> Protocol:
    """Returns the named protocol preset, with field overrides applied.

    Raises:
        ConfigError: unknown preset name or an invalid override.
    """
    if name not in PROTOCOL_PRESETS:
        raise ConfigError(f"unknown protocol preset {name!r}; choose one of {', '.join(PROTOCOL_PRESETS)}")
    base = PROTOCOL_PRESETS[name]
    return validated(Protocol, {**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}},
                     where=f"protocol {name}")


# ---------------------------------------------------------------------------- evaluation


class EvalSpec(Strict):
    """Which accuracy tasks to run and how many items each (``limit=None``: full sets)."""

    version: Literal[1] = 1
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    limit: int | None = Field(100, ge=1)
    seed: int = 1234
    batch_size: int = Field(8, ge=1)
    num_fewshot: int = Field(0, ge=0)


# ---------------------------------------------------------------------------- variants


class Target(Strict):
    """Which modules a step touches, by qualified module name.

    Patterns are globs (``*mlp*``) or regexes prefixed ``re:``. ``layers`` restricts to
    decoder layer indices, e.g. ``"0-3,28"``. ``lm_head`` and ``model.embed_tokens`` are
    ordinary names and can be targeted.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("lm_head", "*embed*")
    layers: str | None = None

    @field_validator("layers")
    @classmethod
    def _layers_syntax(cls, v: str | None) -> str | None:
        if v is not None:
            parse_layers(v)
        return v


def parse_layers(spec: str) -> tuple[int, ...]:
    """Parses ``"0-3,28"`` into ``(0, 1, 2, 3, 28)``. Raises ValueError on bad syntax."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad layer range {part!r}; write e.g. '0-3,28'")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"layer range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    return tuple(sorted(set(out)))


QuantMethod = Literal["rtn", "hqq", "bnb_int8", "bnb_nf4", "bnb_fp4", "torchao_int8", "gptq"]


class QuantOverride(Strict):
    """Per-layer override inside a quantize step; the first matching override wins."""

    target: Target
    bits: Literal[16, 8, 4, 3, 2] | None = None
    group_size: int | None = None
    method: QuantMethod | None = None


class QuantizeStep(Strict):
    """Weight quantization of Linear layers. ``bits=16`` leaves a module unquantized."""

    kind: Literal["quantize"] = "quantize"
    method: QuantMethod = "hqq"
    bits: Literal[16, 8, 4, 3, 2] = 4
    group_size: int | None = Field(64, ge=1)
    threshold: float = Field(6.0, ge=0)  # bnb LLM.int8 outlier threshold; 0 = pure int8
    target: Target = Target()
    overrides: tuple[QuantOverride, ...] = ()


class PruneStep(Strict):
    """Weight pruning: unstructured (any sparsity) or 2:4 semi-structured."""

    kind: Literal["prune"] = "prune"
    method: Literal["magnitude", "wanda"] = "wanda"
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    sparsity: float = Field(0.5, ge=0, lt=1)
    target: Target = Target()


class WidthStep(Strict):
    """Structured width pruning: keep a fraction of FFN channels and of KV head groups."""

    kind: Literal["width"] = "width"
    ffn_keep: float = Field(1.0, gt=0, le=1)
    heads_keep: float = Field(1.0, gt=0, le=1)
    score: Literal["activation", "magnitude"] = "activation"
    layers: str | None = None


class DepthStep(Strict):
    """Depth pruning: drop whole decoder layers by measured importance (or explicitly)."""

    kind: Literal["depth"] = "depth"
    drop: int = Field(0, ge=0)
    score: Literal["angular"] = "angular"
    layers: str | None = None  # explicit layers to drop; overrides the score when given


class MoefyStep(Strict):
    """MoE-style sparsification of dense FFNs: E experts, top-k run per token."""

    kind: Literal["moefy"] = "moefy"
    experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    layers: str | None = None

    @model_validator(mode="after")
    def _k_le_e(self) -> "MoefyStep":
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


class ExpertPruneStep(Strict):
    """For models that are already MoE: drop rarely-routed experts, lower top-k."""

    kind: Literal["expert_prune"] = "expert_prune"
    keep: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)


Step = Annotated[
    Union[QuantizeStep, PruneStep, WidthStep, DepthStep, MoefyStep, ExpertPruneStep],
    Field(discriminator="kind"),
]


class Variant(Strict):
    """An ordered list of compression steps. The empty variant is the baseline."""

    version: Literal[1] = 1
    name: str | None = None
    steps: tuple[Step, ...] = ()

    @property
    def hash(self) -> str:
        """Stable 12-hex-digit hash of the steps (the name does not count)."""
        payload = json.dumps([s.model_dump(mode="json") for s in self.steps], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def is_baseline(self) -> bool:
        return not self.steps


class CalibSpec(Strict):
    """Calibration sample shared by every move that needs one (never evaluation items)."""

    samples: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8)
    seed: int = 0


# ---------------------------------------------------------------------------- loading


def _path_of(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def validated(model: type[Strict], data: Any, where: str = "") -> Any:
    """Validates ``data`` into ``model``; raises ConfigError naming the first bad field path."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        prefix = f"{where}: " if where else ""
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{prefix}{_path_of(err['loc'])}: {err['msg']}{more}") from None


def load_yaml(path: str | Path) -> Any:
    """Reads a YAML file; raises ConfigError for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{at}") from None


def load_json(path: str | Path, model: type[BaseModel]) -> Any:
    """Reads a JSON file into a validated ``model``; ConfigError on bad JSON or fields."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON at line {e.lineno}") from None
    return validated(model, data, where=str(p))  # type: ignore[arg-type]


def load_variant(path: str | Path) -> Variant:
    """Loads a variant file (YAML or JSON)."""
    return validated(Variant, load_yaml(path), where=str(path))


def dump_yaml(obj: Strict) -> str:
    """Serialises an input model to YAML that loads back to an equal object."""
    return yaml.safe_dump(obj.model_dump(mode="json"), sort_keys=False)


# ============================================================================ search
# (search section: SpaceSpec, FidelitySpec, SearchSpec; used by greenopt.space and greenopt.search)

SpaceBits = Literal[16, 8, 4, 3, 2]
PrunePattern = Literal["unstructured", "2:4"]


class SpaceSpec(Strict):
    """The search space over the compression moves.

    Every dimension always contains its identity (16 bits, no pruning, no layer dropped,
    full width, no MoE), so the baseline lies in the space. A dimension is disabled by
    narrowing it to its identity: ``bits=()``, ``prune=()``, ``depth_drop_max=0``,
    ``ffn_keep_min=1``, ``heads_keep=()``, ``moefy_experts=()``. Attention heads are cut in
    whole GQA groups, so ``heads_keep`` lists explicit fractions (multiples of 1 / KV heads).
    Other fractions are of the model's layers, channels or experts; ``keep_step`` is the grid
    of the keep fractions (so variants repeat and their hashes hit the cache).
    """

    version: Literal[1] = 1
    # Per layer group; 16 (unquantized) is always allowed. 2 is left out by default to keep a
    # short search on likely ground (2-bit costs the most accuracy); add it with bits=(8, 4, 2).
    bits: tuple[SpaceBits, ...] = (16, 8, 4)
    methods: tuple[QuantMethod, ...] = ("hqq",)
    group_size: int | None = Field(64, ge=1)
    layer_groups: int = Field(3, ge=1, le=16)  # contiguous groups of decoder layers
    split_attn_ffn: bool = True  # attention and FFN of a group get their own bit width
    lm_head_bits: tuple[SpaceBits, ...] = (16,)
    prune: tuple[PrunePattern, ...] = ("unstructured", "2:4")  # "none" always allowed
    prune_method: Literal["magnitude", "wanda"] = "wanda"
    sparsity: tuple[float, float] = (0.1, 0.5)  # unstructured sparsity range (2:4 is 0.5)
    depth_drop_max: float = Field(0.25, ge=0, lt=1)  # fraction of layers that may be dropped
    ffn_keep_min: float = Field(0.5, gt=0, le=1)
    heads_keep: tuple[float, ...] = ()  # explicit fractions, whole GQA groups (e.g. (0.667,) of 3 KV heads)
    keep_step: float = Field(0.125, gt=0, le=0.5)
    moefy_experts: tuple[int, ...] = ()  # e.g. (4, 8); "no MoE" always allowed
    moefy_top_k: tuple[int, ...] = (1, 2)
    expert_keep_min: float = Field(1.0, gt=0, le=1)  # for models that are already MoE

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] < 1:
            raise ValueError("sparsity range must satisfy 0 < low <= high < 1")
        return v

    @field_validator("heads_keep")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < x < 1 for x in v):
            raise ValueError("heads_keep fractions must lie in (0, 1); 1.0 (all heads) is always allowed")
        return tuple(sorted(set(v), reverse=True))

    @field_validator("moefy_experts", "moefy_top_k")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(x < 1 for x in v):
            raise ValueError("expert counts and top-k must be >= 1")
        return tuple(sorted(set(v)))


class FidelitySpec(Strict):
    """Two fidelities per trial: a cheap quick look, then the full evaluation.

    The quick look computes perplexity on held-aside text (the ``perplexity`` split, never the
    calibration text; ``perplexity_windows`` windows of ``perplexity_tokens`` tokens, each
    starting at a paragraph after BOS; 0 windows skips it) and, when ``quick_protocol`` is set, a
    short energy comparison. A trial is pruned when its perplexity exceeds ``perplexity_cut``
    x the baseline's, or when (relative schemes only) the best end of its quick EEI interval
    exceeds ``energy_cut`` x the target class bound. Survivors get ``eval`` (lm-eval tasks)
    and a comparison under ``protocol``; only these full figures are ever graded.
    """

    version: Literal[1] = 1
    perplexity_windows: int = Field(4, ge=0)
    perplexity_tokens: int = Field(128, ge=8)
    perplexity_cut: float | None = Field(3.0, gt=1)
    quick_protocol: str | None = "quick"
    energy_cut: float | None = Field(1.5, gt=0)
    protocol: str = "cpu"
    eval: EvalSpec = EvalSpec()

    @field_validator("protocol", "quick_protocol")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PROTOCOL_PRESETS:
            raise ValueError(f"unknown protocol preset {v!r}; choose one of {', '.join(PROTOCOL_PRESETS)}")
        return v


class SearchSpec(Strict):
    """Everything ``greenopt search`` needs; stored as ``runs/NAME/search.yaml``.

    Objectives: maximize mean accuracy over the eval tasks; minimize EEI (relative schemes)
    or J/token (absolute schemes). ``max_drop`` is the allowed mean-accuracy loss versus the
    baseline as a fraction (0.05 = 5 accuracy points). ``n_trials`` counts every trial,
    the baseline (trial 0) included; trials lost to a crash or Ctrl-C do not count.
    ``storage`` defaults to ``sqlite:///runs/NAME/study.db``; an RDB URL
    (``postgresql://...``) lets ``greenopt worker`` processes share the study.
    """

    version: Literal[1] = 1
    model: str = "default"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    target: str = Field("A", pattern=r"^[A-Z][A-Za-z0-9+]{0,3}$")
    scheme: str = "relative-eu"
    max_drop: float | None = Field(None, ge=0, le=1)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"  # scripts/bench_search.py compares them
    constrain_sampler: bool = True  # pass the target class and max_drop to the sampler as constraints
    population_size: int | None = Field(None, ge=2)  # NSGA-II; None: min(10, max(2, n_trials // 2))
    n_trials: int = Field(20, ge=1)
    # After the baseline, try each move of the space alone (greenopt.space.single_moves) before
    # the sampler's own picks: the search starts from what a user would try by hand.
    warm_start: bool = True
    timeout_s: float | None = Field(None, gt=0)
    seed: int = 0
    space: SpaceSpec = SpaceSpec()
    fidelity: FidelitySpec = FidelitySpec()
    calib: CalibSpec = CalibSpec()
    meter: str = "auto"
    cpu_watts: float | None = Field(None, gt=0)
    device: str = "auto"
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    runs_dir: str = "runs"
    storage: str | None = None
    study_name: str | None = None
    heartbeat_interval_s: int = Field(60, ge=1)  # RDB storages shared by workers

    @property
    def run_name(self) -> str:
        """``name``, or ``<model>-<target>`` (e.g. ``default-A``)."""
        if self.name:
            return self.name
        stem = Path(self.model.rstrip("/")).name or "model"
        return f"{stem}-{self.target}".replace(" ", "_")

    @property
    def resolved_study_name(self) -> str:
        return self.study_name or self.run_name

    @property
    def resolved_population_size(self) -> int:
        return self.population_size or min(10, max(2, self.n_trials // 2))

# ============================================================================ end of search section
