"""Packed group-wise integer weights: storage shared by the rtn, gptq and hqq backends.

A weight ``W[out, in]`` is stored as unsigned codes ``q`` (2, 3, 4 or 8 bits, packed into
bytes along each row) with one fp16 scale and one fp16 zero per group of ``group_size``
consecutive input features: ``W ~= (q - zero) * scale``. Forward dequantizes the whole
weight and runs a dense matmul: memory shrinks, work per token does not (no fast kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE_DTYPE = torch.float16


def _padded(n: int) -> int:
    return -(-n // 8) * 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs uint8 codes ``[..., n]`` (values < 2**bits) into bytes along the last dim.

    ``n`` is zero-padded to a multiple of 8; 3-bit codes go 8 to 3 bytes.
    """
    n = codes.shape[-1]
    c = F.pad(codes.to(torch.int32), (0, _padded(n) - n))
    if bits == 8:
        return c.to(torch.uint8)
    if bits == 3:
        c = c.reshape(*c.shape[:-1], -1, 8)
        v = (c << torch.arange(0, 24, 3, device=c.device, dtype=torch.int32)).sum(-1, dtype=torch.int32)
        out = torch.stack([(v >> s) & 0xFF for s in (0, 8, 16)], dim=-1)
        return out.reshape(*out.shape[:-2], -1).to(torch.uint8)
    per = 8 // bits
    c = c.reshape(*c.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, device=c.device, dtype=torch.int32)
    return (c << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., n]`` int32 codes."""
    p = packed.to(torch.int32)
    if bits == 8:
        return p[..., :n]
    if bits == 3:
        p = p.reshape(*p.shape[:-1], -1, 3)
        v = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
        c = (v.unsqueeze(-1) >> torch.arange(0, 24, 3, device=p.device, dtype=torch.int32)) & 7
    else:
        shifts = torch.arange(0, 8, bits, device=p.device, dtype=torch.int32)
        c = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*c.shape[:-2], -1)[..., :n]


def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and integer zero per row of ``w[rows, k]`` (range forced to hold 0).

    The scale is rounded to fp16 first, so codes match what is stored.
    """
    maxq = (1 << bits) - 1
    lo = w.min(dim=-1).values.clamp(max=0)
    hi = w.max(dim=-1).values.clamp(min=0)
    scale = ((hi - lo) / maxq).to(SCALE_DTYPE).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w[rows, k]`` with per-row ``scale``/``zero`` (broadcast over k)."""
    return torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, (1 << bits) - 1)


class _Packed(torch.nn.Module):
    """Common storage: packed codes [rows, bytes], fp16 scales/zeros [rows, groups]."""

    greenopt_fast_kernel = False

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_size: int, method: str) -> None:
        super().__init__()
        rows, cols = codes.shape
        if cols % group_size:
            raise ValueError(f"group_size {group_size} does not divide {cols} columns")
        self.bits, self.group_size, self.method, self.cols = bits, group_size, method, cols
        self.register_buffer("codes", pack(codes.to(torch.uint8), bits))
        # Stored as raw int16 bits so that model.to(dtype) cannot round them; devices still move.
        self.register_buffer("scale", scale.reshape(rows, -1).to(SCALE_DTYPE).contiguous().view(torch.int16))
        self.register_buffer("zero", zero.reshape(rows, -1).to(SCALE_DTYPE).contiguous().view(torch.int16))

    @property
    def greenopt_bits(self) -> float:
        stored = (self.codes.numel() * 8 + (self.scale.numel() + self.zero.numel()) * 16)
        return stored / (self.codes.shape[0] * self.cols)

    def _dequant(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
        q = unpack(codes, self.bits, self.cols).float()
        q = q.reshape(*q.shape[:-1], -1, self.group_size)
        zero, scale = zero.view(SCALE_DTYPE).float(), scale.view(SCALE_DTYPE).float()
        w = (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        return w.reshape(*w.shape[:-2], self.cols).to(dtype)


class PackedLinear(_Packed):
    """A Linear whose weight is stored packed; dequantizes on every forward (no fast kernel)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_size: int, bias: torch.Tensor | None, method: str) -> None:
        super().__init__(codes, scale, zero, bits, group_size, method)
        self.out_features, self.in_features = codes.shape
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def greenopt_params(self) -> int:
        return self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    def greenopt_flops_per_token(self) -> int:
        return 2 * self.in_features * self.out_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[out, in]`` these codes stand for."""
        return self._dequant(self.codes, self.scale, self.zero, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, method={self.method}")


class PackedEmbedding(_Packed):
    """An Embedding stored packed; a lookup dequantizes only the selected rows."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_size: int, dtype: torch.dtype, padding_idx: int | None, method: str) -> None:
        super().__init__(codes, scale, zero, bits, group_size, method)
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        # Empty tensor whose dtype follows model.to(dtype): the dtype lookups return.
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def greenopt_params(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def greenopt_flops_per_token(self) -> int:
        return 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequant(self.codes, self.scale, self.zero, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._dequant(self.codes[ids], self.scale[ids], self.zero[ids], self.dtype_probe.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"group_size={self.group_size}, method={self.method}")
