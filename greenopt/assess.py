"""Assess one model: measure J/token against its baseline, evaluate accuracy, grade, card.

This is the library side of ``greenopt measure`` and of ``greenopt verify``:
``assess(AssessSpec(...)) -> Assessment``.

Example:
    >>> from greenopt.assess import AssessSpec, assess
    >>> result = assess(AssessSpec(model="default", protocol="cpu"))  # doctest: +SKIP
    >>> result.card.relative.display                                     # doctest: +SKIP
    '~E (E-F, estimated)'
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field

from greenopt.config import (
    CalibSpec,
    EvalSpec,
    LabelSpec,
    Protocol,
    ProtocolRef,
    RuntimeSpec,
    Variant,
    as_protocol,
)
from greenopt.env import resolve_device, resolve_dtype, set_threads
from greenopt.errors import ConfigError
from greenopt.evaluate import evaluate, validate_tasks
from greenopt.evaluate.cache import baseline_eval, model_key
from greenopt.label import load_scheme
from greenopt.label.card import build_card, current_runtime
from greenopt.measure.select import select_meter
from greenopt.measure.workload import compare_repeated
from greenopt.models import load_model
from greenopt.records import ApplyReport, Comparison, EvalResult, ModelInfo
from greenopt.runtimes import (
    Runtime,
    TransformersRuntime,
    deploy,
    load_artifact,
    realise,
    runtime_class,
    unrealisable,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class AssessSpec(RuntimeSpec, LabelSpec):
    """What to assess and how: the model and where it runs (:class:`RuntimeSpec`), the label
    schemes (:class:`LabelSpec`), then the baseline (None: the uncompressed ``model`` itself),
    the variant, its calibration sample, the protocol (a preset name or fields) and the tasks.
    ``comparisons`` independent comparisons (fresh copies of both models, the variant re-applied,
    each with its own starting side and prompt order) make the reported EEI and its interval.
    ``artifact``: a folder holding the candidate as its runtime built it (an ONNX Runtime GenAI
    export); the candidate is loaded from there for the variant's deploy (reloaded for each fresh
    comparison), ``model`` is the baseline and the variant has no steps."""

    baseline: str | None = None
    variant: Variant = Variant()
    calib: CalibSpec = CalibSpec()  # the calibration sample calibrated moves are fitted on
    protocol: ProtocolRef = "cpu"
    eval: EvalSpec | None = EvalSpec()
    comparisons: int = Field(3, ge=1, le=50)
    artifact: str | None = None

    def resolved_protocol(self) -> Protocol:
        return as_protocol(self.protocol)


@dataclass(frozen=True)
class Assessment:
    """The outcome: the card plus the records it was built from, and the live candidate model."""

    card: object  # greenopt.label.card.LabelCard
    comparison: Comparison
    candidate_eval: EvalResult
    baseline_eval: EvalResult
    apply_report: ApplyReport | None
    candidate: torch.nn.Module | None  # None when the candidate was loaded from an artifact (see runtime)
    tokenizer: object
    runtime: Runtime | None = None  # the candidate as deployed (its runtime); None only for old callers


def preflight(spec: AssessSpec):
    """Checks everything that can fail cheaply before any model work; returns (protocol, meter, schemes)."""

    protocol = spec.resolved_protocol()
    if spec.eval is not None and spec.eval.tasks:
        validate_tasks(spec.eval.tasks, spec.eval.include_path)  # a hub task or bad task file fails here
    rel = load_scheme(spec.relative_scheme)
    abs_ = load_scheme(spec.absolute_scheme) if spec.absolute_scheme else None
    meter = select_meter(spec.meter, cpu_watts=spec.cpu_watts, device=resolve_device(spec.device))
    reason = unrealisable(spec.variant.deploy, spec.variant.steps, resolve_device(spec.device))
    if reason:
        raise ConfigError(reason)
    runtime_class(spec.variant.deploy.runtime)  # installed? (names the pip extra if not)
    if spec.artifact is not None:
        _check_artifact_spec(spec)
    return protocol, meter, rel, abs_


def _check_artifact_spec(spec: AssessSpec) -> None:
    if spec.variant.steps or spec.variant.deploy.runtime == "transformers":
        raise ConfigError(f"artifact {spec.artifact}: the variant must be its runtime's deploy without steps "
                          f"(got {spec.variant.deploy.describe()}, {len(spec.variant.steps)} steps); "
                          "the steps are already in the artifact")
    if spec.baseline not in (None, spec.model):
        raise ConfigError(f"artifact {spec.artifact}: model is the baseline; leave baseline unset "
                          f"(got baseline {spec.baseline} beside model {spec.model})")


def _empty_eval(spec: EvalSpec | None) -> EvalResult:
    return EvalResult(scores=(), limit=spec.limit if spec else None, seed=spec.seed if spec else 0)


def assess(spec: AssessSpec, *, progress: Progress | None = None) -> Assessment:
    """Measures, evaluates and labels ``spec.model`` (with ``spec.variant`` applied), or the
    artifact in ``spec.artifact`` on its runtime against ``spec.model`` as the baseline.

    Args:
        spec: model, baseline, variant, protocol, tasks, meter and label schemes.
        progress: ``progress(stage, done, total)`` callback for progress bars.

    Returns:
        Assessment with the label card.

    Raises:
        GreenoptError: bad input or an unusable meter, before any model work where possible.
    """

    protocol, meter, rel, abs_ = preflight(spec)
    set_threads(spec.threads)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    model, tok, info = load_model(spec.model, dtype=dtype, device=device,
                                  trust_remote_code=spec.trust_remote_code)
    variant = spec.variant
    if spec.artifact is not None:
        baseline, candidate, pair, report = _artifact_sides(spec, model, device)
        base_info, changes = info, True
    else:
        baseline, candidate, pair, report, base_info = _model_sides(spec, model, tok, info, dtype, device, progress)
        changes = bool(variant.steps) or not variant.deploy.is_reference
    comparison = compare_repeated(pair, tok, protocol, meter, spec.comparisons, progress=progress)
    if spec.eval is not None and spec.eval.tasks:
        cand_eval = evaluate(candidate, tok, spec.eval, progress=progress)
        # the baseline is the model as loaded from its files, so its scores can be cached
        base_eval = baseline_eval(baseline, tok, spec.eval, key=model_key(base_info, dtype, device),
                                  progress=progress) if changes else cand_eval
    else:
        cand_eval = base_eval = _empty_eval(spec.eval)
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    runtime = current_runtime(protocol, attention, candidate.describe().dtype).model_copy(update={
        "deployed": candidate.describe(), "baseline": TransformersRuntime(baseline, tok).describe()})
    card = build_card(
        model_id=info.model_id, variant_name=variant.name or ("baseline" if variant.is_baseline else variant.hash),
        variant_hash=variant.hash, comparison=comparison, candidate_eval=cand_eval,
        baseline_eval=base_eval, runtime=runtime,
        relative_scheme=rel, absolute_scheme=abs_, intensity_g_per_kwh=spec.intensity_g_per_kwh,
        apply_report=report,
    )
    return Assessment(card=card, comparison=comparison, candidate_eval=cand_eval, baseline_eval=base_eval,
                      apply_report=report, candidate=None if spec.artifact else model, tokenizer=tok,
                      runtime=candidate)


def _model_sides(spec: AssessSpec, model, tok, info: ModelInfo, dtype: str, device: str, progress: Progress | None):
    """(baseline, candidate runtime, pair(r), apply report, the baseline's ModelInfo): the variant
    applied to ``spec.model``."""
    variant = spec.variant
    changes = bool(variant.steps) or not variant.deploy.is_reference
    if spec.baseline is None or spec.baseline == spec.model:
        baseline, base_info = (copy.deepcopy(model) if changes else model), info
    else:
        baseline, _, base_info = load_model(spec.baseline, dtype=dtype, device=device,
                                            trust_remote_code=spec.trust_remote_code)
    pristine = copy.deepcopy(model) if changes and spec.comparisons > 1 else None
    report = None
    if changes:
        candidate, report = deploy(model, tok, variant, calib=spec.calib, progress=progress)
    else:
        candidate = realise(model, tok, variant.deploy)

    def pair(r: int):
        """Comparison r's two runtimes: the measured ones first, then fresh copies of both."""
        if r == 0:
            return baseline, (candidate if changes else copy.deepcopy(baseline))
        if pristine is None:
            return copy.deepcopy(baseline), copy.deepcopy(model)
        # seeded moves: the same weights again, in fresh memory
        return copy.deepcopy(baseline), deploy(copy.deepcopy(pristine), tok, variant, calib=spec.calib)[0]

    return baseline, candidate, pair, report, base_info


def _artifact_sides(spec: AssessSpec, model, device: str):
    """(baseline, candidate runtime, pair(r), None): ``spec.model`` against the artifact, reloaded per comparison."""
    candidate = load_artifact(spec.artifact, spec.variant.deploy, device)

    def pair(r: int):
        if r == 0:
            return model, candidate
        return copy.deepcopy(model), load_artifact(spec.artifact, spec.variant.deploy, device)

    return model, candidate, pair, None
