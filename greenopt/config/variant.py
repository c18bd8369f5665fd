"""Variants: the ordered compression steps and the modules each one targets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, Field, model_validator

from greenopt.config._base import Strict, load_yaml, validated


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
            raise ValueError(f"layer range {part!r} runs backwards; write it low-high, e.g. '{b}-{a}'")
        out.extend(range(a, b + 1))
    return tuple(sorted(set(out)))


def _layers_syntax(v: str) -> str:
    parse_layers(v)
    return v


#: Decoder layer indices as written in inputs (``"0-3,28"``), checked when the input is validated.
Layers = Annotated[str, AfterValidator(_layers_syntax)]


class Target(Strict):
    """Which modules a step touches, by qualified module name.

    Patterns are globs (``*mlp*``) or regexes prefixed ``re:``. ``layers`` restricts to
    decoder layer indices, e.g. ``"0-3,28"``. ``lm_head`` and ``model.embed_tokens`` are
    ordinary names and can be targeted.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("lm_head", "*embed*")
    layers: Layers | None = None


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
    layers: Layers | None = None


class DepthStep(Strict):
    """Depth pruning: drop whole decoder layers by measured importance (or explicitly)."""

    kind: Literal["depth"] = "depth"
    drop: int = Field(0, ge=0)
    score: Literal["angular"] = "angular"
    layers: Layers | None = None  # explicit layers to drop; overrides the score when given


class MoefyStep(Strict):
    """MoE-style sparsification of dense FFNs: E experts, top-k run per token."""

    kind: Literal["moefy"] = "moefy"
    experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    layers: Layers | None = None

    @model_validator(mode="after")
    def _k_le_e(self) -> MoefyStep:
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


class ExpertPruneStep(Strict):
    """For models that are already MoE: drop rarely-routed experts, lower top-k."""

    kind: Literal["expert_prune"] = "expert_prune"
    keep: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)


class HealStep(Strict):
    """Logit distillation from the model as it was before the variant's first step.

    Trains the remaining float parameters (``mode: full``), or rank-``rank`` adapters on every
    decoder Linear that are then merged into its weight (``mode: lora``: the model keeps its
    shapes and sparsity, and trains far fewer parameters), to match the teacher's next-token
    distributions on calibration text, for ``steps`` optimizer steps or ``max_seconds`` of
    training, whichever comes first. Put it after the structural moves and before any
    quantize step (heal, then quantize).
    """

    kind: Literal["heal"] = "heal"
    steps: int = Field(100, ge=1)
    max_seconds: float = Field(120.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    batch: int = Field(8, ge=1)  # calibration windows per optimizer step
    seq_len: int = Field(256, ge=8)
    temperature: float = Field(1.0, gt=0)
    seed: int = 0
    mode: Literal["full", "lora"] = "full"
    rank: int = Field(8, ge=1, le=256)  # lora only: the adapters' rank
    heldout_rows: int = Field(16, ge=1)  # held-out calibration windows that measure KL before and after

    def hash_payload(self) -> dict:
        """What of the step a variant's hash covers: ``rank`` only in lora mode (so full-mode
        hashes from before lora existed stay as they were)."""
        out = self.model_dump(mode="json")
        if self.mode == "full":
            del out["rank"]
        return out


Step = Annotated[
    QuantizeStep | PruneStep | WidthStep | DepthStep | MoefyStep | ExpertPruneStep | HealStep,
    Field(discriminator="kind"),
]


RuntimeName = Literal["transformers", "onnxruntime-genai", "llama.cpp"]
BlockSize = Literal[16, 32, 64, 128, 256]  # MatMulNBits block sizes (input features a scale covers)
BLOCK_SIZES: tuple[int, ...] = get_args(BlockSize)
#: The runtimes a variant can be deployed on, and the pip extra each needs beyond greenopt's pins.
RUNTIME_EXTRAS: dict[str, str | None] = {"transformers": None, "onnxruntime-genai": "ort", "llama.cpp": "llamacpp"}
#: llama.cpp's own quantization types (``llama_model_quantize``), as ``Deploy.weights`` spells them.
LlamaCppWeights = Literal["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs", "iq4_nl", "q3_k_m", "q3_k_s", "q2_k"]
#: Each runtime's own weight formats besides ``dense`` (what ``--runtime-weights`` and a search may pick).
RUNTIME_WEIGHTS: dict[str, tuple[str, ...]] = {"transformers": (), "onnxruntime-genai": ("int8", "int4"),
                                               "llama.cpp": get_args(LlamaCppWeights)}


class Deploy(Strict):
    """The runtime a variant is deployed, measured and scored on (the deployment is part of the variant).

    ``runtime``: ``transformers`` (greenopt's steps applied in torch), ``onnxruntime-genai``
    (the transformed checkpoint exported and built into an ONNX Runtime GenAI model) or
    ``llama.cpp`` (the transformed checkpoint written as GGUF and run by llama-cpp-python).
    ``dtype``: compute dtype on that runtime (``auto``: the dtype the model was loaded in; on
    llama.cpp the GGUF type of dense weights, ``auto`` being float32).
    ``weights``: the runtime's own weight format: ``dense``, ONNX Runtime's int4/int8
    MatMulNBits with ``block_size`` and ``accuracy_level`` (4: int8 activations, 0: unset), or a
    llama.cpp quantization type (``q8_0``, ``q4_k_m``, ...; :data:`RUNTIME_WEIGHTS`).
    The default (transformers, auto, dense) is the reference runtime.
    """

    runtime: RuntimeName = "transformers"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    weights: Literal["dense", "int8", "int4", LlamaCppWeights] = "dense"
    block_size: BlockSize = 32
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    # transformers only: a static KV cache and the decode step compiled by torch.compile (inductor);
    # the compile seconds are reported apart from the measurement.
    compile: bool = False

    @model_validator(mode="after")
    def _weights_need_a_format(self) -> Deploy:
        if self.compile and self.runtime != "transformers":
            raise ValueError(f"compile is the transformers runtime's torch.compile mode; {self.runtime} has its own "
                             "kernels: leave compile unset, or runtime: transformers")
        if self.runtime == "transformers" and self.weights != "dense":
            raise ValueError(f"transformers takes low-bit weights from quantize steps; weights: {self.weights} is "
                             f"the {_format_owner(self.weights)} format (use runtime: {_format_owner(self.weights)}, "
                             "or a quantize step)")
        if self.weights != "dense" and self.weights not in RUNTIME_WEIGHTS[self.runtime]:
            raise ValueError(f"weights: {self.weights} is {_format_owner(self.weights)}'s format; {self.runtime} "
                             f"takes dense or {', '.join(RUNTIME_WEIGHTS[self.runtime])}")
        if self.runtime == "llama.cpp":
            if (self.block_size, self.accuracy_level) != (32, 4):
                raise ValueError("block_size and accuracy_level are onnxruntime-genai MatMulNBits settings; "
                                 "llama.cpp's types fix their own blocks: leave them unset")
            if self.weights != "dense" and self.dtype not in ("auto", "float32"):
                raise ValueError(f"llama.cpp quantizes {self.weights} from float32 weights; dtype {self.dtype} "
                                 "sets the type of dense weights (weights: dense), leave it unset here")
        return self

    @property
    def is_reference(self) -> bool:
        return self == Deploy()

    def describe(self) -> str:
        """One line, e.g. ``onnxruntime-genai int4 b32 acc4``, ``llama.cpp q4_k_m`` or ``transformers bfloat16``."""
        parts = [self.runtime, self.dtype if self.dtype != "auto" else ""]
        if self.weights != "dense":
            parts += [self.weights] if self.runtime == "llama.cpp" else [
                self.weights, f"b{self.block_size}", f"acc{self.accuracy_level}"]
        parts.append("compiled" if self.compile else "")
        return " ".join(p for p in parts if p)

    def hash_payload(self) -> dict:
        """What of the deployment a variant's hash covers: every field, ``compile`` only when set
        (so hashes from before it existed stay as they were)."""
        out = self.model_dump(mode="json")
        if not self.compile:
            del out["compile"]
        return out


def _format_owner(weights: str) -> str:
    return next(r for r, formats in RUNTIME_WEIGHTS.items() if weights in formats)


class Variant(Strict):
    """An ordered list of compression steps and the runtime they are deployed on.

    The empty variant on the reference runtime is the baseline.
    """

    version: Literal[1] = 1
    name: str | None = None
    steps: tuple[Step, ...] = ()
    deploy: Deploy = Deploy()

    @property
    def hash(self) -> str:
        """Stable 12-hex-digit hash of the steps and a non-reference deployment (the name does not count)."""
        steps = [s.hash_payload() if isinstance(s, HealStep) else s.model_dump(mode="json") for s in self.steps]
        payload = json.dumps(steps if self.deploy.is_reference else {"steps": steps,
                             "deploy": self.deploy.hash_payload()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def is_baseline(self) -> bool:
        return not self.steps and self.deploy.is_reference


def load_variant(path: str | Path) -> Variant:
    """Loads a variant file (YAML or JSON)."""
    return validated(Variant, load_yaml(path), where=str(path))
