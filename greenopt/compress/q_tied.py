"""Tied embedding and head: one packed tensor serves the input embedding and ``lm_head``.

A model with ``tie_word_embeddings`` holds one weight ``[vocab, hidden]`` for both. Quantizing
it once (rtn or hqq codes) and placing one :class:`PackedTied` module at both paths keeps the
model tied: the embedding gathers the codes, scales and zeros of the looked-up rows and
dequantizes only those; the head multiplies by the same codes (torch's fused int4 kernel for
4-bit codes with bfloat16 activations on CPU, as :class:`PackedLinear`; otherwise it dequantizes
the whole matrix on every call). The config stays tied, the checkpoint holds one tensor and
the byte count sees it once. Untying instead would keep the dense embedding beside a quantized
head: a larger model than the one it came from.
"""

from __future__ import annotations

import torch

from greenopt.compress import q_hqq, q_rtn
from greenopt.compress.q_packed import PackedLinear
from greenopt.compress.targeting import set_module

#: Methods whose codes serve both a row lookup and a matmul (weight-only objectives).
#: GPTQ fits the head's inputs and would skew the embedding rows; bnb/torchao keep no packed codes.
TIED_METHODS = ("rtn", "hqq")


class PackedTied(PackedLinear):
    """A packed ``[vocab, hidden]`` weight placed at both the input embedding and ``lm_head``.

    Integer inputs are token ids (the embedding: rows dequantized); floating-point inputs are
    hidden states (the head: ``x @ W.T``, fused int4 kernel where :class:`PackedLinear` has one).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_size: int, bias: torch.Tensor | None, method: str, dtype: torch.dtype,
                 padding_idx: int | None) -> None:
        super().__init__(codes, scale, zero, bits, group_size, bias, method, compute_dtype=dtype)
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        # Empty tensor whose dtype follows model.to(dtype): the dtype lookups return.
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return super().forward(x)
        return self._dequant(self.codes[x], self.scale[x], self.zero[x], self.dtype_probe.dtype)

    def extra_repr(self) -> str:
        return f"tied embedding/head, {super().extra_repr()}"


def _codes(w: torch.Tensor, method: str, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    if method not in TIED_METHODS:
        raise ValueError(f"method {method} cannot quantize a tied embedding/head")
    return (q_rtn if method == "rtn" else q_hqq).quantize_weight(w, bits, group_size)


def quantize_pair(model: torch.nn.Module, embedding: str, head: str, method: str, bits: int,
                  group_size: int) -> list[str]:
    """Replaces the tied ``embedding`` and ``head`` modules by one :class:`PackedTied`, in place.

    Args:
        model: the causal LM whose ``embedding`` and ``head`` share one weight.
        embedding, head: their qualified module names.
        method: ``rtn`` or ``hqq`` (:data:`TIED_METHODS`).
        bits, group_size: code width and input features per scale/zero group.

    Returns:
        The step's notes: what is shared, and whether the head takes a fused kernel.
    """
    emb, lin = model.get_submodule(embedding), model.get_submodule(head)
    w = lin.weight
    codes, scale, zero = _codes(w, method, bits, group_size)
    new = PackedTied(codes, scale, zero, bits, group_size, lin.bias, method, w.dtype,
                     emb.padding_idx).to(w.device)
    set_module(model, embedding, new)
    set_module(model, head, new)
    notes = [(f"tied: {head} and {embedding} share one int{bits} tensor ({method} g{group_size}); "
              "the checkpoint keeps one copy and the config stays tied")]
    if new.greenopt_fast_kernel:
        notes.append(f"{head} runs torch's fused int4 kernel on the shared codes")
    else:
        notes.append(f"{head} dequantizes its int{bits} codes on every call (no fused kernel for {bits}-bit "
                     f"codes with {str(w.dtype).removeprefix('torch.')} activations here): correct but may be "
                     "slower than dense; the kernel probe and the measurement decide whether it pays")
    return notes
