"""What a search explores (SpaceSpec), how it looks at each trial (FidelitySpec), and the whole run (SearchSpec)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from greenopt.config._base import Strict
from greenopt.config.evaluation import CalibSpec, EvalSpec, KLSpec
from greenopt.config.protocol import PROTOCOL_PRESETS
from greenopt.config.runtime import RuntimeSpec
from greenopt.config.variant import HealStep, LlamaCppWeights, QuantMethod

SpaceBits = Literal[16, 8, 4, 3, 2]

#: The most trials one search (or worker) may be asked for: a larger budget is a typo, not a plan.
MAX_TRIALS = 100_000

#: A sampler and subset seed: numpy's and Optuna's samplers take 0 .. 2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


PrunePattern = Literal["unstructured", "2:4"]


def _growing(v: tuple[int | None, ...]) -> tuple[int | None, ...]:
    for a, b in zip(v, v[1:]):
        if a is None or (b is not None and b <= a):
            raise ValueError(f"rungs {list(v)} must be increasing item counts per task (null, the full sets, only last)")
    if any(r is not None and r < 2 for r in v):
        raise ValueError("a rung needs at least 2 items per task")
    return v


def _positive_cut(v: float | str | None) -> float | str | None:
    if isinstance(v, float) and not v > 0:
        raise ValueError("kl_cut must be > 0 nats/token, 'auto' or null")
    return v


#: Item counts per task of the accuracy rungs above the first (None: the full sets).
Rungs = Annotated[tuple[int | None, ...], AfterValidator(_growing)]
#: The KL quick-look cut in nats/token, "auto" (derived from max_drop) or None.
KLCut = Annotated[float | Literal["auto"] | None, AfterValidator(_positive_cut)]


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
    # The output head; on a tied model (tie_word_embeddings) also the input embedding: one tensor.
    lm_head_bits: tuple[SpaceBits, ...] = (16,)
    # The input embedding of an untied model (rtn, rows dequantized on lookup); left out on a
    # tied model, where it is the head's tensor (greenopt.search.space.space_for_model).
    embedding_bits: tuple[SpaceBits, ...] = (16,)
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
    # A heal step (logit distillation) the search may add after a variant's depth, width, MoE and
    # prune moves, before its quantize steps: sampled on or off. None: never healed. Bound it by
    # steps (max_seconds as a safety net): a clock-bound heal can differ between two applications.
    heal: HealStep | None = None
    # The deployment is part of the variant. Compute dtypes tried on transformers beside the dtype
    # the model is loaded in; a search leaves out those without a fast path on its machine (kernel probe).
    dtypes: tuple[Literal["bfloat16", "float16"], ...] = ("bfloat16",)
    # Runtimes beside transformers (always in the space: the baseline runs there); with their own
    # weight formats (onnxruntime-genai MatMulNBits, with block sizes and accuracy levels; llama.cpp's
    # quantization types).
    runtimes: tuple[Literal["onnxruntime-genai", "llama.cpp"], ...] = ()
    runtime_weights: tuple[Literal["dense", "int8", "int4"], ...] = ("int4",)
    # Where onnxruntime-genai's int4/int8 weights come from: "builder" (its own round-to-nearest of
    # the float weights), or greenopt's "gptq"/"rtn" codes of every decoder Linear, imported unchanged
    # (group size = block_size); two or more sample it.
    ort_codes: tuple[Literal["builder", "gptq", "rtn"], ...] = ("builder",)
    llamacpp_weights: tuple[LlamaCppWeights, ...] = ("q8_0", "q4_k_m")
    # transformers with a static KV cache and torch.compile (Deploy.compile): (False, True) samples both.
    compile: tuple[bool, ...] = (False,)
    block_sizes: tuple[Literal[16, 32, 64, 128, 256], ...] = (32,)
    accuracy_levels: tuple[Literal[0, 1, 2, 3, 4], ...] = (4,)

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

    @field_validator("dtypes", "runtimes", "runtime_weights", "block_sizes", "accuracy_levels", "llamacpp_weights",
                     "compile", "ort_codes")
    @classmethod
    def _distinct(cls, v: tuple) -> tuple:
        return tuple(dict.fromkeys(v))

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

    Accuracy is a ladder (:attr:`ladder`): ``eval.limit`` seeded items per task for every
    survivor, more (``rungs``) for those in the top ``1/promote_eta`` of the trials that could
    reach the target (asynchronous successive halving), and ``final_limit`` (None: all) for the
    finalists after the budget, compared pairwise. Accuracy is always reported as the paired
    difference from the baseline on the same items.
    """

    version: Literal[1] = 1
    # The first rung: KL(baseline || variant) on held-aside text against the baseline's cached
    # top-k (greenopt.evaluate.fidelity); None skips it. kl_cut prunes above that many nats/token;
    # "auto" derives it from max_drop (fidelity.kl_cut_for_drop: the KL at which the measured
    # mapping predicts twice the allowed drop), no cut without a max_drop.
    kl: KLSpec | None = KLSpec(windows=16)
    kl_cut: KLCut = "auto"
    perplexity_windows: int = Field(4, ge=0)
    perplexity_tokens: int = Field(128, ge=8)
    perplexity_cut: float | None = Field(3.0, gt=1)
    quick_protocol: str | None = "quick"
    energy_cut: float | None = Field(1.5, gt=0)
    protocol: str = "cpu"
    eval: EvalSpec = EvalSpec()
    # Successive halving of accuracy items: every trial that passes the quick look is scored on
    # eval.limit items per task; one that ranks in the top 1/promote_eta of the trials that could
    # reach the target (by paired accuracy on that rung) is scored again on the next rung's items
    # (null: the full sets). Subsets are nested and seeded, so every rung re-uses the items before it.
    rungs: Rungs = (300,)
    promote_eta: int = Field(3, ge=2, le=10)
    # After the budget the finalists (the confirmed trials) and the baseline are scored on
    # final_limit items per task (null: the full task sets), and compared pairwise (paired z).
    final_scoring: bool = True
    final_limit: int | None = Field(None, ge=2)

    @property
    def ladder(self) -> tuple[int | None, ...]:
        """Items per task at each rung: ``eval.limit``, then the ``rungs`` above it (None: full sets)."""
        first = self.eval.limit
        if first is None:
            return (None,)
        return (first, *(r for r in self.rungs if r is None or r > first))

    @field_validator("protocol", "quick_protocol")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PROTOCOL_PRESETS:
            raise ValueError(f"unknown protocol preset {v!r}; choose one of {', '.join(PROTOCOL_PRESETS)}")
        return v


class SearchSpec(RuntimeSpec):
    """Everything ``greenopt search`` needs; stored as ``runs/NAME/search.yaml``.

    Objectives: maximize mean accuracy over the eval tasks; minimize EEI (relative schemes)
    or J/token (absolute schemes). ``max_drop`` is the allowed mean-accuracy loss versus the
    baseline as a fraction (0.05 = 5 accuracy points). ``n_trials`` counts every trial,
    the baseline (trial 0) included; trials lost to a crash or Ctrl-C do not count.
    ``storage`` defaults to ``sqlite:///runs/NAME/study.db``; an RDB URL
    (``postgresql://...``) lets ``greenopt worker`` processes share the study. Where the model
    runs and how it is metered come from :class:`~greenopt.config.runtime.RuntimeSpec`.
    """

    version: Literal[1] = 1
    target: str = Field("A", pattern=r"^[A-Z][A-Za-z0-9+]{0,3}$")
    scheme: str = "relative-eu"
    max_drop: float | None = Field(None, ge=0, le=1)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"  # scripts/bench_search.py compares them
    constrain_sampler: bool = True  # pass the target class and max_drop to the sampler as constraints
    population_size: int | None = Field(None, ge=2)  # NSGA-II; None: min(10, max(2, n_trials // 2))
    n_trials: int = Field(20, ge=1, le=MAX_TRIALS)
    # After the baseline, try each move of the space alone (greenopt.search.space.single_moves) before
    # the sampler's own picks: the search starts from what a user would try by hand.
    warm_start: bool = True
    timeout_s: float | None = Field(None, gt=0)
    seed: Seed = 0
    space: SpaceSpec = SpaceSpec()
    fidelity: FidelitySpec = FidelitySpec()
    calib: CalibSpec = CalibSpec()
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    runs_dir: str = "runs"
    storage: str | None = None
    study_name: str | None = None
    heartbeat_interval_s: int = Field(60, ge=1)  # RDB storages shared by workers
    # After the budget, re-measure the best confirm_top trials for the target (topped up with the
    # closest that missed it) with confirm_comparisons fresh comparisons each; the reported class
    # and the choice come from those. 0 turns it off (the search's one comparison then decides).
    confirm_top: int = Field(2, ge=0, le=20)
    confirm_comparisons: int = Field(3, ge=2, le=20)

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
