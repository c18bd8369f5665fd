"""Frozen outputs of checking and shipping: recipe issues, validation reports, gate results,
export manifests and loaded-model facts."""

from __future__ import annotations

from typing import Literal

from greenopt.config import CalibSpec, EvalSpec, Protocol, Tier, Variant
from greenopt.config.recipe import Gate
from greenopt.records._base import Record
from greenopt.records.label import LabelCard, VariantInfo
from greenopt.records.measure import ApplyReport


class Issue(Record):
    """One problem in a recipe: the dotted field path and what is wrong."""

    path: str
    message: str

    def line(self, where: str = "") -> str:
        return f"{where + ': ' if where else ''}{self.path}: {self.message}"


class ValidationReport(Record):
    """The outcome of :func:`validate_file`: issues (empty: valid) and informative notes."""

    path: str
    issues: tuple[Issue, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.issues


class GateResult(Record):
    """The gate's verdict. ``reason`` is one line: the first failure, or what passed.

    ``failures`` lists every failed check (empty when ``passed``). ``card`` is the label
    card the verdict was taken on (``None`` when nothing was measured).
    """

    passed: bool
    reason: str
    failures: tuple[str, ...] = ()
    target: str
    max_drop: float | None
    required_tier: Tier | None
    allow_estimate: bool = False
    display: str | None = None
    worst_letter: str | None = None
    tier: Tier | None = None
    protocol_id: str | None = None
    task_drops: dict[str, float] = {}
    card: LabelCard | None = None


class ExportManifest(Record):
    """``greenopt_export.json``: everything needed to reload, reproduce and re-verify an export.

    ``loader`` says what reads the folder back: ``transformers`` (``from_pretrained``), ``greenopt``
    (``greenopt.load``), ``onnxruntime-genai`` (the runtime's ONNX artifact, ``og.Model(DIR)``) or
    ``llama.cpp`` (its GGUF file, ``llama_cpp.Llama(model_path=DIR/model.gguf)``).
    ``dtype`` is the dtype the baseline is loaded in; the variant's ``deploy`` carries the measured
    runtime and its dtype. ``weights_sha256`` covers the loader's weight files (the safetensors'
    tensors, or ``model.onnx`` and its external data).
    """

    format_version: Literal[1] = 1
    greenopt_version: str
    date: str
    base_model: str
    base_model_id: str
    variant: Variant
    variant_name: str
    variant_info: VariantInfo
    loader: Literal["transformers", "greenopt", "onnxruntime-genai", "llama.cpp"]
    loader_reason: str
    dtype: str
    protocol: Protocol | None
    card_protocol_id: str | None
    eval: EvalSpec | None
    relative_scheme: str
    absolute_scheme: str | None
    intensity_g_per_kwh: float
    calib: CalibSpec
    seeds: dict[str, int]
    libraries: dict[str, str]
    weights_sha256: str
    apply_report: ApplyReport | None
    gate: Gate | None
    source: str | None
    notes: tuple[str, ...] = ()


class ModelInfo(Record):
    """Where a model came from and what it is."""

    model_id: str
    source: str  # "default" | "local" | "gguf" | "hub"
    path: str
    architecture: str
    num_layers: int
    num_params: int
    dtype: str
    device: str
