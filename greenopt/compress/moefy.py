"""MoEfication of dense SwiGLU FFNs (Zhang et al. 2022): E experts, top-k run per token.

For each targeted layer, on the calibration sample:

1. Channel contributions ``c_tj = |act(gate_j x_t) * up_j x_t| * ||W_down[:, j]||``.
2. Experts by co-activation: each channel is described by its L2-normalised contributions
   over (up to) 1024 seeded calibration tokens, and the channels are split into E clusters of
   exactly I/E by balanced spherical k-means (seeded init, greedy capacity-constrained
   assignment, at most 25 iterations). Deterministic for a given sample.
3. Weights permuted so expert e owns channels ``e*I/E .. (e+1)*I/E``.
4. Router: a linear layer ``[E, H] + bias``, trained with Adam (300 full-batch steps, lr 1e-2,
   zero init) to predict each expert's share of the contribution mass per token
   (cross-entropy between softmax(logits) and mass / total mass). Top-k of its logits pick
   the experts; their outputs are summed unweighted, as in MoEfication.

The dense ``mlp`` becomes a :class:`~greenopt.compress.moe_module.MoefiedMLP` computing only
the selected slices, so FLOPs per token drop to ``router + top_k/E`` of the FFN; the stored
weights do not shrink. ``config.greenopt_moefy`` records the layers for
:func:`~greenopt.compress.moe_module.rebuild_moefied`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from greenopt.compress import snapshot, step_report
from greenopt.compress.calibration import capture, run_batches
from greenopt.compress.moe_module import MoefiedMLP, rebuild_moefied  # noqa: F401 - re-exported
from greenopt.compress.targeting import decoder_layers, layer_set
from greenopt.config import MoefyStep
from greenopt.errors import MoveError
from greenopt.records import StepReport

log = logging.getLogger(__name__)

_FEATURE_TOKENS = 1024
_KMEANS_ITERS = 25
_ROUTER_STEPS = 300
_ROUTER_LR = 1e-2


def check(model: torch.nn.Module, step: MoefyStep, ctx) -> None:
    """Raises MoveError for non-SwiGLU FFNs, bad expert counts or missing calibration."""
    layers = decoder_layers(model)
    for i in layer_set(model, step.layers):
        mlp = getattr(layers[i], "mlp", None)
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(p) is not torch.nn.Linear or type(p.weight) is not torch.nn.Parameter for p in parts):
            raise MoveError(f"moefy: layers.{i}.mlp is not a dense gate/up/down SwiGLU FFN "
                            f"({type(mlp).__name__}); moefy applies to llama-style FFNs before quantize/prune")
        if any(p.bias is not None for p in parts):
            raise MoveError(f"moefy: layers.{i}.mlp has biases, which moefy does not support")
        n = parts[0].out_features
        if step.experts > n:
            raise MoveError(f"moefy: experts={step.experts} exceeds the {n} FFN channels of layer {i}")
        if n % step.experts:
            raise MoveError(f"moefy: {n} FFN channels of layer {i} do not split into {step.experts} equal "
                            "experts; choose a divisor of the channel count")
    if step.top_k > step.experts:
        raise MoveError(f"moefy: top_k={step.top_k} exceeds experts={step.experts}")
    if ctx.tokenizer is None:
        raise MoveError("moefy needs calibration text for clustering and the router; pass tokenizer= to apply()")


def apply(model: torch.nn.Module, step: MoefyStep, ctx) -> StepReport:
    """Replaces the targeted dense FFNs with MoefiedMLP modules fitted on the calibration sample.

    Args:
        model: the causal LM, changed in place.
        step: experts E, top_k, layers (all when None).
        ctx: the ApplyContext (calibration sample).

    Returns:
        StepReport: params/bytes (router added, nothing removed), FFNs replaced, and notes with
        the FFN output error and the contribution mass the router's top-k holds on calibration.
    """
    before = snapshot(model)
    layers = decoder_layers(model)
    idx = layer_set(model, step.layers)
    inputs = _ffn_inputs(model, {i: layers[i].mlp for i in idx}, ctx.calibration())
    stats = []
    for i in idx:
        layers[i].mlp, st = fit_moefied(layers[i].mlp, inputs.pop(i), step.experts, step.top_k, seed=ctx.calib.seed)
        stats.append(st)
        log.info("moefy layer %d: %s", i, st)
    meta = dict(getattr(model.config, "greenopt_moefy", None) or {"version": 1, "layers": {}})
    meta["layers"] = {**meta.get("layers", {}),
                      **{str(i): {"experts": step.experts, "top_k": step.top_k} for i in idx}}
    model.config.greenopt_moefy = meta
    mean = {k: float(np.mean([st[k] for st in stats])) for k in stats[0]}
    notes = (f"FFN output relative error on calibration {mean['rel_err']:.3f} (worst layer "
             f"{max(st['rel_err'] for st in stats):.3f}); router top-{step.top_k} holds {mean['captured']:.3f} "
             f"of contribution mass (best possible {mean['oracle']:.3f}, chance {step.top_k / step.experts:.3f})",
             "linear router trained on calibration data; selected experts summed unweighted (MoEfication)",
             "stored weights unchanged (router added); not loadable as a transformers MoE: "
             "use rebuild_moefied(model, config.greenopt_moefy)")
    summary = f"moefy: {len(idx)} FFNs split into {step.experts} experts, top-{step.top_k} per token"
    return step_report("moefy", summary, model, before, len(idx), notes=notes)


def _ffn_inputs(model, mlps: dict[int, torch.nn.Module], batch) -> dict[int, torch.Tensor]:
    got: dict[int, list[torch.Tensor]] = {i: [] for i in mlps}

    def hook(name, mod, inp, out):
        got[name].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).float().cpu())

    with capture(mlps, hook):
        run_batches(model, batch)
    return {i: torch.cat(v) for i, v in got.items()}


@torch.no_grad()
def fit_moefied(mlp: torch.nn.Module, x: torch.Tensor, experts: int, top_k: int,
                seed: int = 0) -> tuple[MoefiedMLP, dict[str, float]]:
    """Builds a MoefiedMLP from a dense SwiGLU ``mlp`` and its calibration inputs ``x [N, H]``.

    Args:
        mlp: module with ``gate_proj``, ``up_proj``, ``down_proj`` Linears and ``act_fn``.
        x: FFN inputs over the calibration tokens (float32).
        experts: E, which must divide the channel count.
        top_k: experts run per token.
        seed: seeds the token subset, k-means init and nothing else (the router starts at zero).

    Returns:
        (module, fit statistics on ``x``): ``captured`` and ``oracle`` are the fractions of
        contribution mass in the router's top-k and in the best possible top-k; ``rel_err`` is
        ``||y_moe - y_dense|| / ||y_dense||`` of the FFN output.
    """
    w_g, w_u, w_d = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    dev = w_g.device
    d32 = w_d.float().cpu()
    h = mlp.act_fn(x @ w_g.float().cpu().T) * (x @ w_u.float().cpu().T)
    contrib = h.abs().mul_(d32.norm(dim=0))
    g = torch.Generator().manual_seed(seed)
    sub = torch.randperm(x.shape[0], generator=g)[:_FEATURE_TOKENS]
    labels = balanced_kmeans(torch.nn.functional.normalize(contrib[sub].T, dim=1), experts, generator=g)
    perm = torch.argsort(labels, stable=True)
    mass = contrib[:, perm].reshape(x.shape[0], experts, -1).sum(-1)
    r_w, r_b = train_router(x, mass)
    chosen = (x @ r_w.T + r_b).topk(top_k, dim=-1).indices
    keep = torch.zeros_like(mass).scatter_(1, chosen, 1.0).repeat_interleave(h.shape[1] // experts, dim=1)
    dense = h @ d32.T
    stats = {"captured": float(mass.gather(1, chosen).sum() / mass.sum()),
             "oracle": float(mass.topk(top_k, dim=-1).values.sum() / mass.sum()),
             "rel_err": float(((h[:, perm] * keep) @ d32[:, perm].T - dense).norm() / dense.norm())}
    perm_d = perm.to(dev)
    new = MoefiedMLP(w_g.data.index_select(0, perm_d).clone(), w_u.data.index_select(0, perm_d).clone(),
                     w_d.data.index_select(1, perm_d).contiguous(), r_w.to(dev, w_g.dtype),
                     r_b.to(dev, w_g.dtype), top_k, mlp.act_fn)
    return new, stats


def balanced_kmeans(feats: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    iters: int = _KMEANS_ITERS) -> torch.Tensor:
    """Spherical k-means with exactly ``len(feats) / k`` members per cluster.

    Args:
        feats: ``[n, d]`` unit-norm rows; ``n`` must be divisible by ``k``.
        k: number of clusters.
        generator: seeds the choice of initial centroids.
        iters: maximum Lloyd iterations.

    Returns:
        ``[n]`` int64 cluster labels.
    """
    n = feats.shape[0]
    cap = n // k
    cent = feats[torch.randperm(n, generator=generator)[:k]].clone()
    labels = None
    for _ in range(iters):
        new = _balanced_assign((feats @ cent.T).numpy(), cap)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        cent = torch.zeros_like(cent).index_add_(0, labels, feats)
        cent = torch.nn.functional.normalize(cent, dim=1)
    return labels


def _balanced_assign(sim: np.ndarray, cap: int) -> torch.Tensor:
    # Greedy: most confident channel first, each to its best cluster that still has room.
    n, k = sim.shape
    order = np.argsort(-sim.max(1), kind="stable")
    room = np.full(k, cap)
    labels = np.empty(n, dtype=np.int64)
    for j in order:
        row = np.where(room > 0, sim[j], -np.inf)
        c = int(np.argmax(row))
        labels[j] = c
        room[c] -= 1
    return torch.from_numpy(labels)


def train_router(x: torch.Tensor, mass: torch.Tensor, steps: int = _ROUTER_STEPS,
                 lr: float = _ROUTER_LR) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear router ``(W [E, H], b [E])`` fitted so softmax(xW^T + b) matches each token's mass shares.

    Args:
        x: ``[N, H]`` FFN inputs (float32).
        mass: ``[N, E]`` non-negative expert contribution mass per token.
        steps: full-batch Adam steps.
        lr: Adam learning rate.

    Returns:
        (weight, bias), float32 on CPU.
    """
    target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    x = x.clone()
    with torch.inference_mode(False), torch.enable_grad():
        x, target = x.clone(), target.clone()
        w = torch.zeros(mass.shape[1], x.shape[1], requires_grad=True)
        b = torch.zeros(mass.shape[1], requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w.T + b, target)
            loss.backward()
            opt.step()
    return w.detach(), b.detach()
