"""Compression moves applied in memory by one verb: ``apply(model, variant)``.

Each step kind has a handler module with ``check(model, step, ctx)`` (raises MoveError
before any work) and ``apply(model, step, ctx) -> StepReport``. Handlers load lazily, so a
missing optional backend only fails the step that needs it.

Example:
    >>> from greenopt.compress import apply
    >>> from greenopt.config import Variant, DepthStep
    >>> report = apply(model, Variant(steps=[DepthStep(drop=2)]), tokenizer=tok)  # doctest: +SKIP
    >>> report.params_after < report.params_before
    True
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from greenopt.compress import accounting
from greenopt.compress.calibration import calibration_batch
from greenopt.config import CalibSpec, Variant
from greenopt.errors import MoveError
from greenopt.records import ApplyReport, StepReport

log = logging.getLogger(__name__)

HANDLERS: dict[str, str] = {
    "quantize": "greenopt.compress.quantize",
    "prune": "greenopt.compress.prune",
    "width": "greenopt.compress.width",
    "depth": "greenopt.compress.depth",
    "moefy": "greenopt.compress.moefy",
    "expert_prune": "greenopt.compress.experts",
    "heal": "greenopt.compress.heal",
}


@dataclass
class ApplyContext:
    """What steps share: the tokenizer and the calibration sample spec.

    While one variant is checked or applied, ``earlier`` holds the kinds of its steps before
    the current one, and (during ``apply`` of a variant with a heal step) ``teacher`` holds a
    frozen copy of the model as it was before the variant's first step.
    """

    tokenizer: object = None
    calib: CalibSpec = CalibSpec()
    earlier: tuple[str, ...] = ()
    teacher: torch.nn.Module | None = None

    def calibration(self) -> torch.LongTensor:
        if self.tokenizer is None:
            raise MoveError("this move needs calibration data; pass tokenizer= to apply()")
        return calibration_batch(self.tokenizer, self.calib)


def handler(kind: str):
    """The handler module for a step kind."""
    return importlib.import_module(HANDLERS[kind])


def check(model: torch.nn.Module, variant: Variant, ctx: ApplyContext | None = None) -> None:
    """Checks every step against the model before any work; raises MoveError on the first bad one."""
    ctx = ctx or ApplyContext()
    try:
        for i, step in enumerate(variant.steps):
            ctx.earlier = tuple(s.kind for s in variant.steps[:i])
            handler(step.kind).check(model, step, ctx)
    finally:
        ctx.earlier = ()


def apply(model: torch.nn.Module, variant: Variant, *, tokenizer=None, calib: CalibSpec | None = None,
          ctx: ApplyContext | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> ApplyReport:
    """Applies a variant's steps in order, in place, and reports what really changed.

    Args:
        model: a transformers causal LM (modified in place).
        variant: the ordered steps; the empty variant changes nothing.
        tokenizer: needed by calibrated moves (GPTQ, Wanda, width, depth, MoE, heal).
        calib: calibration sample spec (default: 32 x 128 tokens, seed 0).
        ctx: reuse a context (and its cache) across variants.
        progress: ``progress(stage, done, total)`` callback.

    Returns:
        ApplyReport: bytes, bits per layer, sparsity, FLOPs/token before and after.

    Raises:
        MoveError: a step cannot apply as configured (checked before any work).
    """
    ctx = ctx or ApplyContext(tokenizer=tokenizer, calib=calib or CalibSpec())
    check(model, variant, ctx)
    before = (accounting.param_count(model), accounting.weight_bytes(model), accounting.flops_per_token(model))
    reports: list[StepReport] = []
    try:
        if any(s.kind == "heal" for s in variant.steps):
            ctx.teacher = _frozen_copy(model)
        for i, step in enumerate(variant.steps):
            if progress:
                progress(f"apply {step.kind}", i, len(variant.steps))
            log.info("applying step %d/%d: %s", i + 1, len(variant.steps), step.kind)
            ctx.earlier = tuple(s.kind for s in variant.steps[:i])
            reports.append(handler(step.kind).apply(model, step, ctx))
    finally:
        ctx.earlier, ctx.teacher = (), None
    if progress:
        progress("apply", len(variant.steps), len(variant.steps))
    return ApplyReport(
        variant_hash=variant.hash, steps=tuple(reports),
        params_before=before[0], params_after=accounting.param_count(model),
        weight_bytes_before=before[1], weight_bytes_after=accounting.weight_bytes(model),
        bits_per_layer=accounting.bits_per_layer(model), sparsity=accounting.sparsity(model),
        flops_per_token_before=before[2], flops_per_token_after=accounting.flops_per_token(model),
        fast_kernel=accounting.fast_kernel(model),
    )


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def step_report(kind: str, summary: str, model: torch.nn.Module, before: tuple[int, int], modules: int,
                fast_kernel: bool | None = None, notes: tuple[str, ...] = ()) -> StepReport:
    """Builds a StepReport from (params, bytes) taken before the step and the model now."""
    return StepReport(kind=kind, summary=summary, modules=modules,
                      params_before=before[0], params_after=accounting.param_count(model),
                      weight_bytes_before=before[1], weight_bytes_after=accounting.weight_bytes(model),
                      fast_kernel=fast_kernel, notes=notes)


def snapshot(model: torch.nn.Module) -> tuple[int, int]:
    """(params, bytes) now; pass to step_report after the step."""
    return accounting.param_count(model), accounting.weight_bytes(model)
