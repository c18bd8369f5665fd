"""Runtimes: realise a (transformed) model as the artifact users deploy, and run it there.

One verb: ``realise(model, tokenizer, deploy) -> Runtime``; ``deploy(model, tokenizer, variant)``
casts, applies the variant's steps and realises it, as every measurement does. Energy is metered around the
runtime's own calls (:meth:`Runtime.generate`) with the same meters and GO-1 protocol, and
accuracy is scored on the same artifact (:meth:`Runtime.logits`).

=====================  =========================================  ==========================
runtime                what it realises                           install
=====================  =========================================  ==========================
``transformers``       greenopt's steps in torch, dtype as set    (core)
``onnxruntime-genai``  the transformed checkpoint built by the    ``pip install greenopt[ort]``
                       ONNX Runtime GenAI builder (fp32, or int4/
                       int8 MatMulNBits with block size and
                       accuracy level)
``llama.cpp``          the transformed checkpoint written as GGUF ``pip install greenopt[llamacpp]``
                       (f32/f16/bf16), quantized by llama.cpp     (builds from source:
                       (q8_0, q4_k_m, ...), run by llama-cpp-     ``make llamacpp``)
                       python
=====================  =========================================  ==========================

Example:
    >>> from greenopt.config import Deploy
    >>> from greenopt.runtimes import realise
    >>> from greenopt.testing import tiny_llama, tiny_tokenizer
    >>> rt = realise(tiny_llama(), tiny_tokenizer(), Deploy())
    >>> rt.describe().name
    'transformers'
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from greenopt.compress import ApplyContext, apply
from greenopt.config import (
    RUNTIME_EXTRAS,
    CalibSpec,
    Deploy,
    DepthStep,
    HealStep,
    PruneStep,
    QuantizeStep,
    Step,
    Variant,
    WidthStep,
)
from greenopt.env import cpu_has_bf16, cpu_has_fp16
from greenopt.errors import ConfigError
from greenopt.records import ApplyReport
from greenopt.runtimes.base import Runtime
from greenopt.runtimes.gptq_export import step_refusal
from greenopt.runtimes.hf import TransformersRuntime, weight_kernels

__all__ = ["RUNTIMES", "Runtime", "TransformersRuntime", "as_runtime", "cast", "deploy", "load_artifact", "realise",
           "unrealisable", "weight_kernels"]

#: Runtime name -> "module:class", imported on first use (optional backends stay optional).
RUNTIMES: dict[str, str] = {
    "transformers": "greenopt.runtimes.hf:TransformersRuntime",
    "onnxruntime-genai": "greenopt.runtimes.ortgenai:OrtGenAIRuntime",
    "llama.cpp": "greenopt.runtimes.llamacpp:LlamaCppRuntime",
}
#: How each runtime's missing backend is installed, beyond ``pip install 'greenopt[<extra>]'``.
_INSTALL_NOTES = {"llama.cpp": " (it builds llama-cpp-python from source; or make llamacpp)"}

_BF16_EMULATED = ("dtype bfloat16 on this CPU has no native kernels (no avx512_bf16, amx_bf16 or bf16 flag): "
                  "it would run emulated; use float32 here")

# Steps whose result is an ordinary dense checkpoint of the same architecture (fewer layers,
# narrower FFNs, zeroed or retrained weights), which an exporter/builder outside torch can read.
_PLAIN_CHECKPOINT_STEPS = (DepthStep, WidthStep, PruneStep, HealStep)


def unrealisable(deploy: Deploy, steps: Iterable[Step], device: str = "cpu",
                 cpu_flags: tuple[str, ...] | None = None) -> str | None:
    """Why ``deploy`` cannot realise ``steps`` on ``device`` (one line naming move and runtime), or None.

    Used by :func:`realise`, by ``greenopt recipe validate`` and by the search space, which
    never samples what a runtime cannot realise.
    """
    if deploy.runtime != "transformers":
        for step in steps:
            reason = _unreadable(deploy, step)
            if reason:
                return reason
        if deploy.runtime == "llama.cpp":  # f16 GGUF runs on F16C conversions, which every x86-64-v3 CPU has
            if str(device).startswith("cuda"):
                return f"greenopt runs llama.cpp on cpu (a CPU build of llama-cpp-python), not {device}; use --device cpu"
            return f"llama.cpp {_BF16_EMULATED}" if deploy.dtype == "bfloat16" and not cpu_has_bf16(cpu_flags) else None
        if deploy.dtype not in ("auto", "float32") and not str(device).startswith("cuda"):
            return f"{deploy.runtime} on CPU runs float32 (with int4/int8 weights); dtype {deploy.dtype} is for CUDA"
        return None
    if str(device).startswith("cuda"):
        return None
    if deploy.compile and not _cpp_compiler():
        return ("compile on CPU needs a C++ compiler for torch.compile's inductor (none of c++, g++, clang++ on "
                "PATH); install one (apt-get install g++), or leave compile unset")
    if deploy.dtype == "bfloat16" and not cpu_has_bf16(cpu_flags):
        return _BF16_EMULATED
    if deploy.dtype == "float16" and not cpu_has_fp16(cpu_flags):
        return "dtype float16 on this CPU has no native kernels (no avx512_fp16 flag); use float32 or bfloat16"
    return None


def _unreadable(deploy: Deploy, step: Step) -> str | None:
    """Why ``deploy``'s runtime (not transformers) cannot read what ``step`` makes, one line, or None."""
    runtime = deploy.runtime
    if runtime == "llama.cpp":
        if step.kind == "quantize":
            return ("llama.cpp cannot realise a quantize step (greenopt's own packed weights; llama.cpp quantizes "
                    "itself): drop the step and set weights: q8_0, q4_k_m, ..., or runtime: transformers")
        if step.kind in ("moefy", "expert_prune"):
            return (f"llama.cpp cannot realise a {step.kind} step (MoE-split FFNs; greenopt writes dense llama "
                    "GGUF); drop the step, or runtime: transformers")
        if isinstance(step, WidthStep) and step.layers is not None:
            return (f"llama.cpp cannot realise a width step on layers {step.layers} (its llama architecture has one "
                    "FFN width and head count for all layers); leave layers unset, or runtime: transformers")
    if runtime == "onnxruntime-genai" and isinstance(step, QuantizeStep):
        return step_refusal(step, deploy)  # gptq/rtn codes are imported as a GPTQ checkpoint
    if not isinstance(step, _PLAIN_CHECKPOINT_STEPS):
        return (f"{runtime} cannot realise a {step.kind} step (it reads ordinary checkpoints: "
                "depth, width, prune and heal steps); use its own weights: int4/int8, "
                "or runtime: transformers")
    return None


def _cpp_compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)


def cast(model: torch.nn.Module, deploy: Deploy) -> torch.nn.Module:
    """Puts a dense model in the deployment's dtype, in place, before any step is applied
    (quantizers then see the activations' dtype their kernels are chosen for). ``auto`` keeps it."""
    if deploy.dtype != "auto" and deploy.runtime == "transformers":
        dtype = getattr(torch, deploy.dtype)
        _cast_saved_state(model, dtype)
        if getattr(model, "config", None) is not None:
            model.config.dtype = dtype  # saved checkpoints then reload in the dtype that was measured
    return model


def _cast_saved_state(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and persistent buffers to ``dtype``, as loading the checkpoint in that dtype
    would give; non-persistent buffers (rotary ``inv_freq``, computed in fp32 at load) stay as they are."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)


def realise(model: torch.nn.Module, tokenizer, deploy: Deploy, *, steps: Iterable[Step] = ()) -> Runtime:
    """Realises a transformed model on the runtime of ``deploy``.

    Args:
        model: the model with ``steps`` applied (and :func:`cast` before them).
        tokenizer: its tokenizer.
        deploy: the runtime, dtype and runtime-side weight format.
        steps: the steps applied, checked against what the runtime can realise.

    Returns:
        The runtime, ready to generate and score. A ``transformers`` runtime wraps ``model``
        itself; others build their artifact from it (``model`` is left as found).

    Raises:
        ConfigError: the runtime is not installed (names the pip extra) or cannot realise a step
            or dtype here (names the step and the runtime).
    """
    device = str(next(model.parameters()).device)
    reason = unrealisable(deploy, steps, device)
    if reason:
        raise ConfigError(reason)
    cls = runtime_class(deploy.runtime)
    if cls is TransformersRuntime:
        cast(model, deploy)
        return TransformersRuntime(model, tokenizer, compiled=deploy.compile)
    return cls.build(model, tokenizer, deploy)


def deploy(model: torch.nn.Module, tokenizer, variant: Variant, *, calib: CalibSpec | None = None,
           ctx: ApplyContext | None = None, progress=None) -> tuple[Runtime, ApplyReport]:
    """A variant as measured: ``model`` cast to its dtype, its steps applied (in place), realised.

    The one sequence every verb that measures a variant runs (assess, the search's trials and
    confirmations, the benchmarks), so the steps always see the deployment's dtype.

    Returns:
        The runtime and what the steps changed (:func:`greenopt.compress.apply`), its
        ``weight_bytes_after`` the deployed artifact's (an ONNX or GGUF build's own weights).

    Raises:
        MoveError: a step cannot apply; ConfigError: as :func:`realise`.
    """
    reason = unrealisable(variant.deploy, variant.steps, str(next(model.parameters()).device))
    if reason:
        raise ConfigError(reason)  # before the steps run: a runtime's refusal should not cost their minutes
    cast(model, variant.deploy)
    report = apply(model, variant, tokenizer=tokenizer, calib=calib, ctx=ctx, progress=progress)
    runtime = realise(model, tokenizer, variant.deploy, steps=variant.steps)
    deployed = runtime.weight_bytes()
    if deployed is not None and deployed != report.weight_bytes_after:
        report = report.model_copy(update={"weight_bytes_after": deployed})
    return runtime, report


def load_artifact(folder: str | Path, deploy: Deploy, device: str = "cpu") -> Runtime:
    """Loads an artifact a runtime built and exported (e.g. an ONNX Runtime GenAI folder), as it is deployed.

    Args:
        folder: the folder holding the artifact and its build record (a greenopt export of it).
        deploy: the deployment it was built for; its runtime reads the folder.
        device: ``cpu`` or ``cuda:N``.

    Returns:
        The runtime, ready to generate and score.

    Raises:
        ConfigError: ``deploy`` is the transformers runtime (its artifact is a checkpoint: load the
            model and :func:`realise` it), or the runtime is not installed (names the pip extra).
    """
    cls = runtime_class(deploy.runtime)
    if cls is TransformersRuntime:
        raise ConfigError(f"{folder}: a transformers deployment has no runtime artifact; load the checkpoint "
                          "(greenopt.load) and realise it")
    return cls(Path(folder), deploy, device)


def runtime_class(name: str) -> type[Runtime]:
    """The class of runtime ``name``, imported now; a missing backend raises one line naming the extra."""
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    module, _, attr = RUNTIMES[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        extra = RUNTIME_EXTRAS.get(name)
        raise ConfigError(f"runtime {name} is not installed ({e.name or e}); "
                          f"pip install 'greenopt[{extra}]'{_INSTALL_NOTES.get(name, '')}") from None


def as_runtime(model_or_runtime, tokenizer) -> Runtime:
    """A runtime as is, or a transformers model wrapped in :class:`TransformersRuntime`."""
    if isinstance(model_or_runtime, Runtime):
        return model_or_runtime
    return TransformersRuntime(model_or_runtime, tokenizer)
