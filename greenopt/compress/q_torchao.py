"""torchao int8 weight-only: ``quantize_(model, Int8WeightOnlyConfig(...), filter_fn=...)``.

The Linear modules stay ``nn.Linear`` with an ``Int8Tensor`` weight (per row when
``group_size`` is None, else per group). In eager mode torchao 0.18 converts the int8 weight
to the activation dtype and runs a dense matmul on every call (no fused kernel); the fused
int8 path needs ``torch.compile``. So ``greenopt_fast_kernel`` is False here.
"""

from __future__ import annotations

import torch


def _stored_bits(w: torch.Tensor) -> float:
    inner = [getattr(w, n) for n in type(w).__tensor_flatten__(w)[0]]
    stored = sum(t.numel() * t.element_size() for t in inner if t is not None)
    return stored * 8 / w.numel()


def quantize_all(model: torch.nn.Module, items, step, ctx) -> tuple[str, ...]:
    """Quantizes the planned Linears in place, one ``quantize_`` call per group size."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup, PerRow

    by_group: dict[int | None, set[str]] = {}
    for it in items:
        full = it.group_size is None or it.group_size == it.module.in_features
        by_group.setdefault(None if full else it.group_size, set()).add(it.name)
    for gs, names in by_group.items():
        cfg = Int8WeightOnlyConfig(granularity=PerRow() if gs is None else PerGroup(gs))
        quantize_(model, cfg, filter_fn=lambda m, fqn, names=names: fqn in names)
    for it in items:
        m = model.get_submodule(it.name)
        m.greenopt_bits = _stored_bits(m.weight)
        m.greenopt_fast_kernel = False
    return ("torchao_int8: eager forward converts int8 weights to float per call; "
            "the fused int8 kernel needs torch.compile",)
