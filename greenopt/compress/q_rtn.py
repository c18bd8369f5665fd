"""Round-to-nearest: greenopt's own group-wise asymmetric min/max quantization, 8/4/3/2 bits.

Calibration-free; stores packed codes (:mod:`greenopt.compress.q_packed`) and dequantizes on
forward, so memory drops but there is no fast kernel. Also quantizes embeddings.
"""

from __future__ import annotations

import torch

from greenopt.compress.q_packed import (
    PackedEmbedding,
    PackedLinear,
    minmax_params,
    quantize_codes,
)
from greenopt.compress.targeting import set_module


def quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """Codes ``[rows, cols]``, scales and zeros ``[rows, cols // group_size]`` of ``w``."""
    rows, cols = w.shape
    g = w.detach().float().reshape(rows * cols // group_size, group_size)
    scale, zero = minmax_params(g, bits)
    codes = quantize_codes(g, scale, zero, bits)
    return codes.reshape(rows, cols), scale.reshape(rows, -1), zero.reshape(rows, -1)


def quantize_module(module: torch.nn.Module, bits: int, group_size: int) -> torch.nn.Module:
    """A packed replacement for an ``nn.Linear`` or ``nn.Embedding``."""
    codes, scale, zero = quantize_weight(module.weight, bits, group_size)
    if isinstance(module, torch.nn.Embedding):
        return PackedEmbedding(codes, scale, zero, bits, group_size, module.weight.dtype,
                               module.padding_idx, "rtn").to(module.weight.device)
    return PackedLinear(codes, scale, zero, bits, group_size, module.bias, "rtn",
                        compute_dtype=module.weight.dtype).to(module.weight.device)


def quantize_all(model: torch.nn.Module, items, step, ctx) -> tuple[str, ...]:
    """Replaces every planned module in place."""

    for it in items:
        set_module(model, it.name, quantize_module(it.module, it.bits, it.group_size))
    return ()
