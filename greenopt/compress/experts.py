"""Expert pruning for models that are already MoE (Mixtral-style), and top-k reduction.

Router statistics: the calibration sample runs through the model and, per MoE layer, each
expert's count of tokens routed to it (top-k of the router logits) is recorded, with its
summed router probability as tie-break. The ``round(keep x E)`` most used experts of each
layer are kept (the same count in every layer, so ``config.num_local_experts`` holds); their
router rows and expert weights are sliced out. ``top_k`` lowers (or raises) the experts run
per token. The result is an ordinary, smaller Mixtral that reloads with ``from_pretrained``.

Routing semantics are unchanged: softmax over the remaining experts, top-k, renormalised, so a
token whose chosen experts all survive is computed exactly as before.

Layout (transformers 5.x): ``layer.mlp`` is a sparse MoE block with ``gate`` (router,
``weight [E, H]``, ``top_k``, ``num_experts``) and ``experts`` holding fused 3-D parameters
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, ``num_experts``); a ModuleList of
per-expert modules is handled too.
"""

from __future__ import annotations

import logging

import torch

from greenopt.compress import snapshot, step_report
from greenopt.compress.calibration import capture, run_batches
from greenopt.compress.targeting import decoder_layers
from greenopt.config import ExpertPruneStep
from greenopt.errors import MoveError
from greenopt.records import StepReport

log = logging.getLogger(__name__)

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k")


def moe_blocks(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """``{layer index: MoE block}`` for decoder layers whose FFN is a router + experts block."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        if block is None:
            block = getattr(layer, "block_sparse_moe", None)
        gate = getattr(block, "gate", None)
        if block is not None and hasattr(block, "experts") and isinstance(getattr(gate, "weight", None), torch.Tensor):
            out[i] = block
    return out


def _num_experts(block: torch.nn.Module) -> int:
    return int(block.gate.weight.shape[0])


def _top_k(block: torch.nn.Module) -> int:
    return int(getattr(block, "top_k", None) or getattr(block.gate, "top_k"))


def kept_count(experts: int, keep: float) -> int:
    """Experts kept of ``experts`` for fraction ``keep`` (at least 1)."""
    return min(max(round(keep * experts), 1), experts)


def check(model: torch.nn.Module, step: ExpertPruneStep, ctx) -> None:
    """Raises MoveError for dense models, top-k above the kept experts, or missing calibration."""
    blocks = moe_blocks(model)
    if not blocks:
        raise MoveError(f"expert_prune: {type(model).__name__} has no MoE blocks (mlp.gate + mlp.experts); "
                        "use moefy for dense models")
    for i, block in blocks.items():
        e = _num_experts(block)
        kept = kept_count(e, step.keep)
        top_k = step.top_k or _top_k(block)
        if top_k > kept:
            raise MoveError(f"expert_prune: top_k={top_k} exceeds the {kept} experts kept of {e} in layer {i}; "
                            "raise keep or lower top_k")
        experts = block.experts
        if not isinstance(experts, torch.nn.ModuleList) and not (
                hasattr(experts, "gate_up_proj") or hasattr(experts, "down_proj")):
            raise MoveError(f"expert_prune: layer {i} experts ({type(experts).__name__}) have an unknown layout")
    if any(kept_count(_num_experts(b), step.keep) < _num_experts(b) for b in blocks.values()) and ctx.tokenizer is None:
        raise MoveError("expert_prune needs calibration text for router statistics; pass tokenizer= to apply()")


def apply(model: torch.nn.Module, step: ExpertPruneStep, ctx) -> StepReport:
    """Drops the least-routed experts of every MoE layer and sets top-k.

    Args:
        model: a Mixtral-style causal LM, changed in place.
        step: ``keep`` fraction of experts and optional new ``top_k``.
        ctx: the ApplyContext (calibration sample for router statistics).

    Returns:
        StepReport: params/bytes before and after, MoE layers touched, notes with the routed
        share of calibration tokens that the dropped experts had, and expert FLOPs per token.
    """
    before = snapshot(model)
    blocks = moe_blocks(model)
    flops_before = sum(expert_flops_per_token(b) for b in blocks.values())
    notes: list[str] = []
    e0 = _num_experts(next(iter(blocks.values())))
    kept = kept_count(e0, step.keep)
    if kept < e0:
        counts, probs = router_stats(model, blocks, ctx.calibration())
        lost = []
        for i, block in blocks.items():
            order = sorted(range(_num_experts(block)), key=lambda e: (-counts[i][e], -probs[i][e], e))
            keep_idx = sorted(order[:kept])
            lost.append(1.0 - float(counts[i][keep_idx].sum() / counts[i].sum().clamp_min(1)))
            log.info("expert_prune layer %d: keeping experts %s (token counts %s)", i, keep_idx,
                     counts[i].long().tolist())
            _slice_experts(block, torch.tensor(keep_idx))
        notes.append(f"dropped experts had {sum(lost) / len(lost):.3f} of routed calibration tokens "
                     f"(worst layer {max(lost):.3f})")
        _set_config(model.config, _EXPERT_COUNT_KEYS, kept)
    if step.top_k is not None:
        for block in blocks.values():
            for mod in (block, block.gate):
                if hasattr(mod, "top_k"):
                    mod.top_k = step.top_k
        _set_config(model.config, _TOP_K_KEYS, step.top_k)
    flops_after = sum(expert_flops_per_token(b) for b in blocks.values())
    notes.append(f"router + active expert FLOPs per token: {flops_before} -> {flops_after} "
                 "(fused expert tensors are not Linear modules; this figure counts them)")
    summary = (f"expert_prune: kept {kept} of {e0} experts in {len(blocks)} MoE layers, "
               f"top_k {_top_k(next(iter(blocks.values())))}")
    return step_report("expert_prune", summary, model, before, len(blocks), notes=tuple(notes))


def expert_flops_per_token(block: torch.nn.Module) -> int:
    """Router plus top_k experts' matmul FLOPs per token (2 x multiply-adds) of one MoE block."""
    e, h = block.gate.weight.shape
    per_expert = sum(p.numel() for p in block.experts.parameters()) // _num_experts(block)
    return 2 * e * h + 2 * _top_k(block) * per_expert


@torch.no_grad()
def router_stats(model: torch.nn.Module, blocks: dict[int, torch.nn.Module],
                 batch: torch.LongTensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer: tokens routed to each expert, and summed router probability, over ``batch``."""
    counts = {i: torch.zeros(_num_experts(b), dtype=torch.float64) for i, b in blocks.items()}
    probs = {i: torch.zeros(_num_experts(b), dtype=torch.float64) for i, b in blocks.items()}

    def hook(i, mod, inp, out):
        logits = (out[0] if isinstance(out, tuple) else out).detach().float()
        logits = logits.reshape(-1, logits.shape[-1])
        top = logits.topk(_top_k(blocks[i]), dim=-1).indices
        counts[i] += torch.bincount(top.flatten().cpu(), minlength=logits.shape[-1]).double()
        probs[i] += logits.softmax(-1).sum(0).double().cpu()

    with capture({i: b.gate for i, b in blocks.items()}, hook):
        run_batches(model, batch)
    return counts, probs


def _slice_experts(block: torch.nn.Module, keep: torch.Tensor) -> None:
    gate = block.gate
    gate.weight = torch.nn.Parameter(gate.weight.data[keep.to(gate.weight.device)].contiguous(),
                                     requires_grad=gate.weight.requires_grad)
    if getattr(gate, "bias", None) is not None:
        gate.bias = torch.nn.Parameter(gate.bias.data[keep.to(gate.bias.device)].contiguous(),
                                       requires_grad=gate.bias.requires_grad)
    experts = block.experts
    if isinstance(experts, torch.nn.ModuleList):
        block.experts = torch.nn.ModuleList([experts[j] for j in keep.tolist()])
    else:
        for name, p in list(experts.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == _num_experts_of(experts, p):
                setattr(experts, name, torch.nn.Parameter(p.data[keep.to(p.device)].contiguous(),
                                                          requires_grad=p.requires_grad))
    for mod in (block, gate, experts):
        for attr in ("num_experts", "num_local_experts"):
            if hasattr(mod, attr):
                setattr(mod, attr, len(keep))


def _num_experts_of(experts: torch.nn.Module, p: torch.Tensor) -> int:
    return int(getattr(experts, "num_experts", p.shape[0]))


def _set_config(cfg, keys: tuple[str, ...], value: int) -> None:
    hit = [k for k in keys if hasattr(cfg, k)]
    if not hit:
        raise MoveError(f"expert_prune: config {type(cfg).__name__} has none of {keys}; cannot record the change")
    for k in hit:
        setattr(cfg, k, value)
