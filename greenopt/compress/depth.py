"""Depth pruning: drop whole decoder layers, chosen by measured importance or listed explicitly.

Score ``angular`` follows Gromov et al. 2024 ("The unreasonable ineffectiveness of the deeper
layers"): for a block of ``n = drop`` consecutive layers starting at layer l, the angular
distance ``arccos(cos(h_l, h_{l+n})) / pi`` between the hidden state entering layer l and the
one leaving layer l+n-1, averaged over every calibration token. The block with the smallest
distance changes the residual stream least and is dropped. The first and last layers are
never chosen by the score (list them in ``layers`` to drop them).

The layers leave the ModuleList, ``layer_idx`` attributes are renumbered and
``config.num_hidden_layers`` (and ``config.layer_types`` when present) updated, so the model
saves and reloads as an ordinary smaller model and its KV cache works in ``generate()``.
Every dropped layer removes its whole share of work per token.
"""

from __future__ import annotations

import logging

import torch

from greenopt.compress import snapshot, step_report
from greenopt.compress.calibration import run_batches
from greenopt.compress.targeting import decoder_layers, layer_set
from greenopt.config import DepthStep
from greenopt.errors import MoveError
from greenopt.records import StepReport

log = logging.getLogger(__name__)


def check(model: torch.nn.Module, step: DepthStep, ctx) -> None:
    """Raises MoveError when the drop would remove every layer or cannot be scored."""
    n = len(decoder_layers(model))
    if step.layers is not None:
        listed = layer_set(model, step.layers)
        if step.drop and step.drop != len(listed):
            raise MoveError(f"depth: drop={step.drop} but layers {step.layers!r} lists {len(listed)}; "
                            "give one or make them agree")
        if len(listed) >= n:
            raise MoveError(f"depth: layers {step.layers!r} would drop all {n} decoder layers; keep at least one")
        return
    if step.drop >= n:
        raise MoveError(f"depth: drop={step.drop} would remove all {n} decoder layers; keep at least one")
    if step.drop > n - 2:
        raise MoveError(f"depth: the score keeps the first and last layer, so at most {n - 2} of {n} layers "
                        f"can be dropped (got drop={step.drop}); list layers explicitly to drop more")
    if step.drop and ctx.tokenizer is None:
        raise MoveError("depth: the angular score needs calibration text; pass tokenizer= to apply() "
                        "or list the layers to drop")


def apply(model: torch.nn.Module, step: DepthStep, ctx) -> StepReport:
    """Drops decoder layers in place and shrinks the config to match.

    Args:
        model: the causal LM, changed in place.
        step: ``drop`` (count chosen by the angular score) or explicit ``layers``.
        ctx: the ApplyContext (calibration sample for the score).

    Returns:
        StepReport: params/bytes before and after, the number of layers removed, and a note
        naming them with their measured distance.
    """
    before = snapshot(model)
    notes: list[str] = []
    if step.layers is not None:
        drop = layer_set(model, step.layers)
        notes.append(f"dropped explicitly listed layers {list(drop)}")
    elif step.drop:
        dist = block_distances(model, ctx.calibration(), step.drop)
        start = min(dist, key=dist.get)
        drop = tuple(range(start, start + step.drop))
        notes.append(f"dropped layers {list(drop)}: angular distance {dist[start]:.4f} across the block "
                     f"(largest candidate {max(dist.values()):.4f})")
    else:
        drop = ()
    n_before = len(decoder_layers(model))
    log.info("depth: dropping layers %s of %d", list(drop), n_before)
    drop_layers(model, drop)
    summary = f"dropped {len(drop)} of {n_before} decoder layers" + (f" {list(drop)}" if drop else "")
    return step_report("depth", summary, model, before, len(drop), notes=tuple(notes))


@torch.no_grad()
def block_distances(model: torch.nn.Module, batch: torch.LongTensor, n: int) -> dict[int, float]:
    """Mean angular distance (in units of pi, 0..1) across each block of ``n`` layers.

    Args:
        model: a model with decoder layers at ``model.model.layers``.
        batch: calibration token ids ``[samples, seq_len]``.
        n: block size (layers dropped together).

    Returns:
        ``{start_layer: distance}`` for blocks that keep the first and last layer.
    """
    layers = decoder_layers(model)
    starts = range(1, len(layers) - n)  # block [l, l+n) keeps layer 0 and the last layer
    sums = {s: 0.0 for s in starts}
    count = [0]
    held: dict[int, torch.Tensor] = {}

    def pre_hook(i):
        def hook(mod, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).detach().float()
            if i in sums:
                held[i] = h
            if i - n in held:
                sums[i - n] += float(_angular(held.pop(i - n), h).sum())
                if i - n == starts[0]:
                    count[0] += h.shape[0] * h.shape[1]
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        run_batches(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {s: v / max(count[0], 1) for s, v in sums.items()}


def _angular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi


def drop_layers(model: torch.nn.Module, drop) -> None:
    """Removes the listed decoder layers, renumbers ``layer_idx`` and updates the config.

    Args:
        model: the causal LM, changed in place.
        drop: indices of layers to remove (may be empty).

    Raises:
        MoveError: an index is out of range or every layer would go.
    """
    layers = decoder_layers(model)
    drop = set(drop)
    if any(i < 0 or i >= len(layers) for i in drop) or len(drop) >= len(layers):
        raise MoveError(f"depth: cannot drop layers {sorted(drop)} from a model with {len(layers)} layers")
    kept = [i for i in range(len(layers)) if i not in drop]
    new = torch.nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(new):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = j
    model.model.layers = new
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    remap = {old: j for j, old in enumerate(kept)}
    for key in ("greenopt_width", "greenopt_moefy"):
        meta = getattr(cfg, key, None)
        if isinstance(meta, dict) and isinstance(meta.get("layers"), dict):
            meta["layers"] = {str(remap[int(i)]): v for i, v in meta["layers"].items() if int(i) in remap}
            setattr(cfg, key, meta)
