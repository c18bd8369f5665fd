"""Packed group-wise integer weights: storage shared by the rtn, gptq and hqq backends.

A weight ``W[out, in]`` is stored as unsigned codes ``q`` (2, 3, 4 or 8 bits, packed into
bytes along each row) with one fp16 scale and one fp16 zero per group of ``group_size``
consecutive input features: ``W ~= (q - zero) * scale``. Forward dequantizes the whole
weight and runs a dense matmul: memory shrinks, work per token does not (no fast kernel) --
except 4-bit Linears with bfloat16 activations on CPU, which run torch's fused int4 kernel
(``_weight_int4pack_mm_for_cpu``, the tinygemm layout) on the same codes, scales and zeros.
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


_INT4_CPU = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")
_INT4_GROUPS = (32, 64, 128, 256)


class PackedLinear(_Packed):
    """A Linear whose weight is stored packed; dequantizes on every forward, or, for 4-bit codes
    with bfloat16 activations on CPU, runs the fused int4 kernel (:attr:`greenopt_fast_kernel`)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_size: int, bias: torch.Tensor | None, method: str,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(codes, scale, zero, bits, group_size, method)
        self.out_features, self.in_features = codes.shape
        self.compute_dtype = compute_dtype  # the dtype of the Linear it replaced: what activations will be
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def greenopt_params(self) -> int:
        return self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    def greenopt_flops_per_token(self) -> int:
        return 2 * self.in_features * self.out_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[out, in]`` these codes stand for."""
        return self._dequant(self.codes, self.scale, self.zero, dtype)

    @property
    def greenopt_fast_kernel(self) -> bool:  # type: ignore[override]
        """True when forward takes the fused int4 kernel: 4-bit codes in a bfloat16 model on CPU."""
        return self.compute_dtype == torch.bfloat16 and self.codes.device.type == "cpu" and self._int4_ok()

    def _int4_ok(self) -> bool:
        return self.bits == 4 and _INT4_CPU and self.group_size in _INT4_GROUPS and self.in_features % 32 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self._int4_ok():
            packed, scales_zeros = self._int4_cpu()
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), packed, self.group_size,
                                                  scales_zeros).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def _int4_cpu(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes in the kernel's layout, built once: W = (q - 8) * scale + (8 - zero) * scale."""
        cached = self.__dict__.get("_int4_cache")
        if cached is None or cached[0] is not self.codes:
            q = unpack(self.codes, 4, self.cols).to(torch.int32).contiguous()
            scale, zero = self.scale.view(SCALE_DTYPE).float(), self.zero.view(SCALE_DTYPE).float()
            sz = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            cached = (self.codes, torch._convert_weight_to_int4pack_for_cpu(q, 2), sz)
            self.__dict__["_int4_cache"] = cached
        return cached[1], cached[2]

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
