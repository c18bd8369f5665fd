"""bitsandbytes: LLM.int8 (``bnb_int8``, 8 bits) and 4-bit NF4/FP4 (``bnb_nf4``/``bnb_fp4``).

Replaces ``nn.Linear`` by ``Linear8bitLt`` / ``Linear4bit`` (bitsandbytes 0.50, CPU and CUDA).
Int8 is per output row (``group_size`` does not apply); 4-bit uses ``group_size`` as the
absmax block size (no double quantization). ``greenopt_fast_kernel`` says whether
bitsandbytes runs a dedicated low-bit kernel here rather than dequantizing: always on CUDA;
on CPU only with AVX-512 (int8, ``torch._int_mm``) or AVX-512-BF16 (4-bit gemv). A dedicated
kernel is not always faster: LLM.int8 with outliers is known to cost more energy than fp16.
"""

from __future__ import annotations

import copy
import functools

import torch

from greenopt.compress.targeting import set_module

BITS_BY_METHOD = {"bnb_int8": (8,), "bnb_nf4": (4,), "bnb_fp4": (4,)}
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def problem(method: str, module: torch.nn.Module, bits: int, group_size: int | None) -> str | None:
    """Why this backend cannot quantize ``module`` as asked, or None."""
    if method != "bnb_int8" and group_size is not None and group_size not in BLOCK_SIZES:
        return f"{method} block size (group_size) must be one of {BLOCK_SIZES}, got {group_size}"
    return None


def _cpu_int8_kernel() -> bool:
    from bitsandbytes.backends.cpu import ops

    return bool(getattr(ops, "_has_avx512", False)) and torch.__version__ >= "2.6"


def _cpu_4bit_kernel() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


class _Hooks:
    """greenopt accounting hooks shared by both bitsandbytes replacements."""

    @property
    def greenopt_params(self) -> int:
        return self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    def greenopt_flops_per_token(self) -> int:
        return 2 * self.in_features * self.out_features

    @property
    def greenopt_bits(self) -> float:
        stored = self.weight.numel() * self.weight.element_size() + self.greenopt_extra_bytes()
        return stored * 8 / (self.in_features * self.out_features)


def canonical_4bit(weight) -> tuple[torch.Tensor, object] | None:
    """``(data, quant_state)`` of a 4-bit weight in bitsandbytes' canonical layout, or None if it is in it.

    On CPUs with AVX-512-BF16, ``Linear4bit.forward`` in eval mode repacks its weight once for the
    fused CPU kernel (``quant_state.packing_format_for_cpu``): nibbles reordered in 32-row blocks,
    absmax transposed to ``[K/blocksize, N]`` and rounded to bfloat16, double quantization undone.
    bitsandbytes' own inverse restores the nibbles but leaves a non-nested absmax transposed in
    bfloat16 (and re-quantizes a nested one, lossily), so saving after a forward wrote a model that
    reloads with other logits. This returns new tensors and a new QuantState and leaves ``weight``
    untouched: the nibbles in canonical order, the absmax the kernel actually used (its bfloat16
    values, exact in float32, canonical order) and ``nested=False``, so a reload, repacked at its first
    forward on such a CPU, computes exactly what the repacked module computed.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    qs = weight.quant_state
    if qs is None or not getattr(qs, "packing_format_for_cpu", False):
        return None
    work = copy.copy(qs)
    work.original_nested = False  # keep the kernel's absmax rather than re-quantizing it
    data, work = _convert_weight_packed_for_cpu_inverse(weight.data, work)
    work.absmax = qs.absmax.T.reshape(-1).to(torch.float32).contiguous()
    work.nested = False
    for k in ("state2", "offset"):
        work.__dict__.pop(k, None)
    return data, work


@functools.lru_cache(maxsize=1)
def _classes():
    import bitsandbytes as bnb

    class GreenoptLinear8bitLt(_Hooks, bnb.nn.Linear8bitLt):
        """Linear8bitLt whose int8 state also follows ``model.to(device)``."""

        def _apply(self, fn, recurse=True):
            super()._apply(fn, recurse)
            dev = self.weight.device
            for holder in (self.weight, self.state):
                if getattr(holder, "CB", None) is not None:
                    holder.CB = self.weight.data
                if getattr(holder, "SCB", None) is not None:
                    holder.SCB = holder.SCB.to(dev)
            return self

        @property
        def greenopt_fast_kernel(self) -> bool:
            return self.weight.device.type == "cuda" or _cpu_int8_kernel()

        def greenopt_extra_bytes(self) -> int:
            scb = self.state.SCB if self.state.SCB is not None else self.weight.SCB
            return 0 if scb is None else scb.numel() * scb.element_size()

    class GreenoptLinear4bit(_Hooks, bnb.nn.Linear4bit):
        """Linear4bit reporting its quantization state to greenopt's accounting."""

        @property
        def greenopt_fast_kernel(self) -> bool:
            return self.weight.device.type == "cuda" or _cpu_4bit_kernel()

        def greenopt_extra_bytes(self) -> int:
            canon = canonical_4bit(self.weight)  # count what is stored, not the CPU kernel's bf16 copy
            qs = self.weight.quant_state if canon is None else canon[1]
            return sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values()
                       if isinstance(v, torch.Tensor))

    return GreenoptLinear8bitLt, GreenoptLinear4bit


def quantize_module(lin: torch.nn.Linear, method: str, group_size: int | None, threshold: float) -> torch.nn.Module:
    """A bitsandbytes replacement for ``lin``, quantized on ``lin``'s device."""
    import bitsandbytes as bnb

    int8_cls, four_cls = _classes()
    dev, bias = lin.weight.device, lin.bias
    w = lin.weight.detach().clone().cpu()
    if method == "bnb_int8":
        new = int8_cls(lin.in_features, lin.out_features, bias=bias is not None,
                       has_fp16_weights=False, threshold=threshold)
        new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        quant_type = method.removeprefix("bnb_")
        new = four_cls(lin.in_features, lin.out_features, bias=bias is not None,
                       compute_dtype=lin.weight.dtype, compress_statistics=False, quant_type=quant_type)
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, module=new,
                                       blocksize=group_size or 64, compress_statistics=False)
    if bias is not None:
        new.bias = torch.nn.Parameter(bias.detach().clone().cpu(), requires_grad=False)
    return new.to(dev).train(lin.training)  # bitsandbytes quantizes here; keep the replaced mode


def quantize_all(model: torch.nn.Module, items, step, ctx) -> tuple[str, ...]:
    """Replaces every planned Linear in place."""

    for it in items:
        set_module(model, it.name, quantize_module(it.module, it.method, it.group_size, step.threshold))
    notes = []
    if any(it.method == "bnb_int8" for it in items):
        notes.append(f"bnb_int8: per-row int8, outlier threshold {step.threshold:g} (group_size unused)")
    return tuple(notes)
