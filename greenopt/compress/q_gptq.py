"""GPTQ (Frantar et al. 2022): calibrated 8/4/3/2-bit weights, greenopt's own implementation.

Why our own: the design named optimum's GPTQ integration with gptqmodel, but gptqmodel 7.7
pulls a CUDA build of torch and auto-gptq 0.7.1 does not import with transformers 5 (and
needs CUDA 12). The algorithm is small: per Linear, the Hessian ``H = 2 X^T X`` of its
calibration inputs, dampened, inverted through Cholesky; columns are quantized one by one
(optionally in decreasing ``diag(H)`` order, "act-order", with groups fixed up front) and each
column's error is spread onto the not-yet-quantized columns. Layers are processed in order,
so each layer's Hessian sees the outputs of the already-quantized layers before it. Results
go into the same packed module as rtn (dequantize on forward, no fast kernel); an
optimum/gptqmodel path could be added later for its GPU kernels.
"""

from __future__ import annotations

import logging

import torch

from greenopt.compress.calibration import capture, run_batches
from greenopt.compress.q_packed import PackedLinear, minmax_params, quantize_codes
from greenopt.compress.targeting import decoder_layers, layer_index, set_module

log = logging.getLogger(__name__)

DAMP = 0.01  # fraction of mean(diag(H)) added to the diagonal
ACT_ORDER = True
ROWS_PER_STEP = 8


@torch.no_grad()
def gptq_weight(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, act_order: bool = ACT_ORDER,
                damp: float = DAMP) -> tuple[torch.Tensor, ...]:
    """GPTQ codes ``[rows, cols]``, scales and zeros ``[rows, cols // group_size]``.

    Args:
        w: the weight ``[rows, cols]``.
        h: ``2 X^T X / n`` over calibration inputs, ``[cols, cols]``.
        bits: code width.
        group_size: consecutive input features sharing a scale and zero; divides cols.
        act_order: quantize columns by decreasing Hessian diagonal.
        damp: dampening, as a fraction of the mean Hessian diagonal.
    """
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = cols // group_size
    # Group parameters from the (dead-zeroed) weights; with act-order they stay fixed.
    scale, zero = (t.reshape(rows, groups) for t in minmax_params(w.reshape(rows * groups, group_size), bits))
    perm = (torch.argsort(torch.diag(h), descending=True, stable=True) if act_order
            else torch.arange(cols, device=w.device))
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(rows, cols, device=w.device)
    block, order = _block_size(group_size), perm.tolist()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // group_size
            if not act_order and col % group_size == 0:
                # Groups start on block starts (i == 0, w1 not yet changed), so w holds the
                # current weights of the whole group, later blocks included.
                s, z = minmax_params(w[:, col:col + group_size].contiguous(), bits)
                scale[:, g], zero[:, g] = s, z
            q = quantize_codes(w1[:, i:i + 1], scale[:, g], zero[:, g], bits)[:, 0]
            codes[:, i1 + i] = q
            e = (w1[:, i] - (q - zero[:, g]) * scale[:, g]) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero


def _block_size(group_size: int, limit: int = 128) -> int:
    # A block must start at every group start (see gptq_weight); largest divisor <= limit.
    return max(d for d in range(1, min(group_size, limit) + 1) if group_size % d == 0)


class _Hessians:
    """Running ``2 X^T X / n`` per module name from forward hooks."""

    def __init__(self) -> None:
        self.h: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}

    def __call__(self, name, mod, inp, out) -> None:
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        n_old, m = self.n.get(name, 0), x.shape[0]
        h = self.h.get(name)
        h = torch.zeros(x.shape[1], x.shape[1], device=x.device) if h is None else h * (n_old / (n_old + m))
        self.h[name] = h + (2.0 / (n_old + m)) * (x.t() @ x)
        self.n[name] = n_old + m


def _replace(model, it, h: torch.Tensor | None, act_order: bool) -> None:
    w = it.module.weight
    if h is None:  # never ran on the calibration sample: no error to spread, plain rounding
        log.warning("gptq: %s saw no calibration input; rounding it to nearest", it.name)
        h = torch.eye(w.shape[1], device=w.device)
    codes, scale, zero = gptq_weight(w, h.to(w.device), it.bits, it.group_size, act_order)
    new = PackedLinear(codes, scale, zero, it.bits, it.group_size, it.module.bias, "gptq",
                      compute_dtype=it.module.weight.dtype)
    set_module(model, it.name, new.to(w.device))


class _Stop(Exception):
    pass


def _layer_inputs(model, layer0, batch) -> list[tuple[torch.Tensor, dict]]:
    got: list[tuple[torch.Tensor, dict]] = []

    def pre(mod, args, kwargs):
        got.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    handle = layer0.register_forward_pre_hook(pre, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(0, batch.shape[0], ROWS_PER_STEP):
            try:
                model(batch[i:i + ROWS_PER_STEP].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return got


@torch.inference_mode()
def quantize_all(model: torch.nn.Module, items, step, ctx, act_order: bool | None = None) -> tuple[str, ...]:
    """Quantizes the planned Linears layer by layer on ``ctx.calibration()``."""
    act_order = ACT_ORDER if act_order is None else act_order
    batch = ctx.calibration()
    by_layer: dict[int, list] = {}
    rest = []
    for it in items:
        i = layer_index(it.name)
        (rest if i is None else by_layer.setdefault(i, [])).append(it)
    if by_layer:
        layers = decoder_layers(model)
        states = _layer_inputs(model, layers[0], batch)
        for idx in range(max(by_layer) + 1):
            layer, todo = layers[idx], by_layer.get(idx, [])
            if todo:
                hs = _Hessians()
                with capture({it.name: it.module for it in todo}, hs):
                    for x, kw in states:
                        layer(x, **kw)
                for it in todo:
                    _replace(model, it, hs.h.get(it.name), act_order)
                log.info("gptq: layer %d, %d modules", idx, len(todo))
            outs = [layer(x, **kw) for x, kw in states]
            states = [(o[0] if isinstance(o, tuple) else o, kw) for o, (_, kw) in zip(outs, states)]
    if rest:
        hs = _Hessians()
        with capture({it.name: it.module for it in rest}, hs):
            run_batches(model, batch, ROWS_PER_STEP)
        for it in rest:
            _replace(model, it, hs.h.get(it.name), act_order)
    n_tok = batch.numel()
    return (f"gptq: greenopt's own implementation, {batch.shape[0]}x{batch.shape[1]} calibration tokens "
            f"({n_tok}), act_order={act_order}, damp={DAMP}",)
