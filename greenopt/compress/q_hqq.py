"""HQQ (half-quadratic quantization, calibration-free), 8/4/3/2 bits, through the ``hqq`` package.

The codes, scales and zeros come from ``hqq.core.quantize.Quantizer`` (HQQ's proximal
optimizer of the zero/scale, axis 1 = groups along input features). They are stored in
greenopt's packed module rather than ``HQQLinear`` because HQQLinear keeps its scales in a
plain dict: ``model.to(device)`` leaves them behind and byte accounting cannot see them.
HQQ's fast kernels are GPU-only extras; on CPU it dequantizes on forward like rtn.
"""

from __future__ import annotations

import torch

from greenopt.compress.q_packed import PackedLinear
from greenopt.compress.targeting import set_module


def quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """HQQ codes ``[rows, cols]``, scales and zeros ``[rows, cols // group_size]`` (float zeros)."""
    from hqq.core.quantize import Quantizer

    rows, cols = w.shape
    codes, meta = Quantizer.quantize(
        w.detach().float(), nbits=bits, channel_wise=True, group_size=group_size, optimize=True,
        round_zero=bits == 4, axis=1, bitpack=False, device=w.device,
    )
    return (codes.reshape(rows, cols), meta["scale"].reshape(rows, -1).float(),
            meta["zero"].reshape(rows, -1).float())


def quantize_all(model: torch.nn.Module, items, step, ctx) -> tuple[str, ...]:
    """Replaces every planned Linear in place."""

    for it in items:
        codes, scale, zero = quantize_weight(it.module.weight, it.bits, it.group_size)
        new = PackedLinear(codes, scale, zero, it.bits, it.group_size, it.module.bias, "hqq",
                          compute_dtype=it.module.weight.dtype)
        set_module(model, it.name, new.to(it.module.weight.device))
    return ()
