"""Variants: the ordered compression steps and the modules each one targets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

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


Step = Annotated[
    QuantizeStep | PruneStep | WidthStep | DepthStep | MoefyStep | ExpertPruneStep,
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


def load_variant(path: str | Path) -> Variant:
    """Loads a variant file (YAML or JSON)."""
    return validated(Variant, load_yaml(path), where=str(path))
