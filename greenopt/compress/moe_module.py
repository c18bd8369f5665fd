"""The MoEfied FFN module: a dense SwiGLU FFN whose channels are split into E contiguous experts.

Semantics (MoEfication, Zhang et al. 2022): the router scores the E experts per token, the
top-k are selected, and the output is the UNWEIGHTED sum of the selected experts' slices of
the original FFN, ``down[:, S] @ (act(gate[S] x) * up[S] x)`` with S the union of the selected
slices. With ``top_k == experts`` this is exactly the dense FFN (channels permuted).

No transformers MoE architecture can load this: Mixtral-style blocks weight each expert's
output by softmax-then-top-k router probabilities and hold separate SwiGLU experts with their
own full-size weights, whereas here the router only selects and the experts are slices of one
FFN. So greenopt defines its own module and records ``config.greenopt_moefy`` (per-layer
``experts``/``top_k``); ``rebuild_moefied(model, meta)`` re-creates the modules on a model built
from that config so a saved state dict loads back. State-dict keys: ``mlp.gate_proj.weight``,
``mlp.up_proj.weight`` (``[I, H]``, permuted), ``mlp.down_proj_t.weight`` (down projection
TRANSPOSED, ``[I, H]``, so every expert's slice is contiguous), ``mlp.router.weight``/``.bias``.
A plain transformers loader reports ``mlp.down_proj.weight`` missing: it cannot run this.

Decode (one token): on CPU the selected experts' contiguous slices are used in place (one
small matmul triple per expert, no copies); on CUDA they are gathered with ``index_select``
(no host sync, static shapes, so CUDA graphs can capture it). ``decode_gather`` overrides.

Expert weights are held by ``ExpertWeight`` modules, not ``nn.Linear``, so later prune or
quantize steps (which select Linear modules) leave them alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from greenopt.compress.targeting import decoder_layers


class ExpertWeight(torch.nn.Module):
    """Holds ``weight`` (and optional ``bias``) under the same state-dict keys as a Linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


class MoefiedMLP(torch.nn.Module):
    """Runs only the top-k of E contiguous channel slices of a SwiGLU FFN per token.

    Args:
        gate, up: ``[I, H]`` weights, channels already permuted so expert e owns rows
            ``e*I/E .. (e+1)*I/E``.
        down: ``[H, I]`` weight with the same column permutation.
        router_weight, router_bias: ``[E, H]`` and ``[E]`` router (top-k of its logits).
        top_k: experts run per token.
        act_fn: the FFN's activation (e.g. SiLU).
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, router_weight: torch.Tensor,
                 router_bias: torch.Tensor, top_k: int, act_fn: torch.nn.Module) -> None:
        super().__init__()
        self.experts = router_weight.shape[0]
        self.top_k = top_k
        self.hidden_size, self.intermediate_size = down.shape
        if self.intermediate_size % self.experts or not 1 <= top_k <= self.experts:
            raise ValueError(f"{self.intermediate_size} channels, {self.experts} experts, top_k={top_k}")
        self.expert_size = self.intermediate_size // self.experts
        self.gate_proj, self.up_proj = ExpertWeight(gate), ExpertWeight(up)
        self.down_proj_t = ExpertWeight(down.T.contiguous())
        self.router = ExpertWeight(router_weight, router_bias)
        self.act_fn = act_fn
        self.decode_gather: bool | None = None  # None: gather on CUDA, slice views on CPU
        self.register_buffer("_offsets", torch.arange(self.expert_size, device=down.device), persistent=False)

    def greenopt_flops_per_token(self) -> int:
        """Router plus the three matmuls over top_k/E of the channels."""
        return 2 * self.hidden_size * self.experts + 6 * self.hidden_size * self.top_k * self.expert_size

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, top_k]`` expert indices for tokens ``x [N, H]``."""
        logits = F.linear(x, self.router.weight, self.router.bias)
        return logits.topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        top = self.route(x2)
        if x2.shape[0] > 1:
            out = self._per_expert(x2, top)
        elif self.decode_gather if self.decode_gather is not None else x2.is_cuda:
            out = self._gathered(x2, top[0])
        else:
            out = sum(self._expert(x2, e) for e in top[0].tolist())
        return out.reshape(shape)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        sl = slice(e * self.expert_size, (e + 1) * self.expert_size)
        h = self.act_fn(F.linear(x, self.gate_proj.weight[sl])) * F.linear(x, self.up_proj.weight[sl])
        return h @ self.down_proj_t.weight[sl]

    def _gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        rows = (experts[:, None] * self.expert_size + self._offsets).reshape(-1)
        h = self.act_fn(F.linear(x, self.gate_proj.weight.index_select(0, rows)))
        h = h * F.linear(x, self.up_proj.weight.index_select(0, rows))
        return h @ self.down_proj_t.weight.index_select(0, rows)

    def _per_expert(self, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        hit = torch.zeros(x.shape[0], self.experts, dtype=torch.bool, device=x.device)
        hit.scatter_(1, top, True)
        for e in torch.nonzero(hit.any(0)).flatten().tolist():
            tok = torch.nonzero(hit[:, e]).flatten()
            out.index_add_(0, tok, self._expert(x.index_select(0, tok), e).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.experts}, "
                f"top_k={self.top_k}")


def rebuild_moefied(model: torch.nn.Module, meta: dict | None) -> None:
    """Replaces the dense FFNs listed in ``config.greenopt_moefy`` with empty MoefiedMLP modules.

    Call on a model built from the saved config (after ``rebuild_width`` when the model has
    per-layer widths), then load the saved state dict into it.

    Args:
        model: a llama-style model whose listed layers still have dense ``mlp`` modules.
        meta: the ``greenopt_moefy`` dict: ``{"version": 1, "layers": {"i": {"experts": E,
            "top_k": k}}}`` (None or empty: nothing to do).
    """
    if not meta:
        return
    layers = decoder_layers(model)
    for i, spec in meta.get("layers", {}).items():
        mlp = layers[int(i)].mlp
        g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        e = int(spec["experts"])
        layers[int(i)].mlp = MoefiedMLP(
            torch.empty_like(g), torch.empty_like(u), torch.empty_like(d),
            torch.zeros(e, g.shape[1], dtype=g.dtype, device=g.device),
            torch.zeros(e, dtype=g.dtype, device=g.device), int(spec["top_k"]), mlp.act_fn)
