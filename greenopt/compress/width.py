"""Structured width pruning: physically smaller FFN and attention matrices.

FFN (llama-style ``gate_proj``/``up_proj``/``down_proj``): keep ``ffn_keep`` of the
intermediate channels of each targeted layer, i.e. rows of gate/up and columns of down.
Importance ``activation`` is ``||X_j|| * ||W_down[:, j]||`` with ``||X_j||`` the norm of
down_proj's input channel j over the calibration sample; ``magnitude`` is
``||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||``. The kept count is rounded to a multiple of
8 when at least 8 remain.

Attention: keep ``heads_keep`` of the query heads by keeping whole KV groups (a KV head with
its query heads), so GQA stays consistent: rows of q/k/v, columns of o. A group's importance
``activation`` is the summed ``(||X_c|| * ||W_o[:, c]||)^2`` over o_proj input channels of its
query heads; ``magnitude`` uses ``||W_o[:, c]||^2`` alone. A fraction that cannot be met with
whole groups (e.g. 3 of 4 query heads in groups of 2) is an error, never silently rounded.

Saving: when every decoder layer ends with the same sizes, the config's
``intermediate_size``, ``num_attention_heads`` and ``num_key_value_heads`` are updated (with
``head_dim`` explicit), and ``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` give
the same model. When ``layers`` selects a subset, sizes differ per layer, which no transformers
llama config can express: the config keeps its sizes and ``config.greenopt_width`` records the
layers that differ; a plain ``from_pretrained`` then fails on shapes, and a loader must build
the model from its config, call ``rebuild_width(model, config.greenopt_width)`` and load the
state dict.
"""

from __future__ import annotations

import logging

import torch

from greenopt.compress import snapshot, step_report
from greenopt.compress.calibration import input_feature_norms
from greenopt.compress.targeting import decoder_layers, layer_set
from greenopt.config import WidthStep
from greenopt.errors import MoveError
from greenopt.records import StepReport

log = logging.getLogger(__name__)

_FFN = ("gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _linears(owner: torch.nn.Module, names: tuple[str, ...], where: str) -> list[torch.nn.Linear]:
    out = []
    for n in names:
        m = getattr(owner, n, None)
        if type(m) is not torch.nn.Linear or type(m.weight) is not torch.nn.Parameter:
            raise MoveError(f"width: {where}.{n} is {type(m).__name__}, not a dense Linear; "
                            "apply width before quantize/prune/moefy, on llama-style layers")
        out.append(m)
    return out


def ffn_keep_count(size: int, keep: float) -> int:
    """Channels kept of ``size``: ``round(keep x size)``, to a multiple of 8 when >= 8, at least 1."""
    k = round(keep * size)
    if k >= 8:
        k = max(8, 8 * round(k / 8))
    return min(max(k, 1), size)


def head_counts(attn: torch.nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a llama-style attention module."""
    hd = int(attn.head_dim)
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, hd


def kept_groups(n_q: int, n_kv: int, keep: float, where: str = "") -> int:
    """KV groups kept for ``heads_keep=keep``; raises MoveError when whole groups cannot meet it."""
    per = n_q // n_kv
    q = round(keep * n_q)
    if q == 0 or q % per:
        ok = ", ".join(f"{g * per / n_q:.3g}" for g in range(1, n_kv + 1))
        raise MoveError(f"width{where}: heads_keep={keep} keeps {q} of {n_q} query heads, but GQA groups have "
                        f"{per} query heads per KV head; choose heads_keep in {{{ok}}}")
    return q // per


def check(model: torch.nn.Module, step: WidthStep, ctx) -> None:
    """Raises MoveError for non-llama layers, cuts that break GQA, or missing calibration."""
    layers = decoder_layers(model)
    for i in layer_set(model, step.layers):
        layer = layers[i]
        if step.ffn_keep < 1:
            _linears(getattr(layer, "mlp", None), _FFN, f"layers.{i}.mlp")
        if step.heads_keep < 1:
            attn = getattr(layer, "self_attn", None)
            _linears(attn, _ATTN, f"layers.{i}.self_attn")
            n_q, n_kv, _ = head_counts(attn)
            kept_groups(n_q, n_kv, step.heads_keep, where=f" (layer {i})")
    if step.score == "activation" and (step.ffn_keep < 1 or step.heads_keep < 1) and ctx.tokenizer is None:
        raise MoveError("width score 'activation' needs calibration text; pass tokenizer= or use score 'magnitude'")


def apply(model: torch.nn.Module, step: WidthStep, ctx) -> StepReport:
    """Shrinks FFN channels and KV head groups of the targeted layers in place.

    Args:
        model: the causal LM, changed in place.
        step: fractions kept (``ffn_keep``, ``heads_keep``), score, and layers (all when None).
        ctx: the ApplyContext (calibration sample for the activation score).

    Returns:
        StepReport: params/bytes before and after, Linear modules replaced, and notes on the
        sizes reached and on how the result reloads.
    """
    before = snapshot(model)
    layers = decoder_layers(model)
    idx = layer_set(model, step.layers)
    norms = _activation_norms(model, step, idx, ctx) if step.score == "activation" else {}
    touched, sizes = 0, set()
    with torch.no_grad():
        for i in idx:
            layer = layers[i]
            if step.ffn_keep < 1:
                touched += _shrink_ffn(layer.mlp, step.ffn_keep, norms.get(f"{i}.down_proj"))
            if step.heads_keep < 1:
                touched += _shrink_heads(layer.self_attn, step.heads_keep, norms.get(f"{i}.o_proj"))
            sizes.add(layer_sizes(layer))
    uniform = sync_config(model)
    log.info("width: layer sizes now %s (uniform: %s)", sorted(sizes), uniform)
    notes = [f"layer sizes (intermediate, query heads, KV heads): {sorted(sizes)}"]
    notes.append("config updated; reloads with AutoModelForCausalLM.from_pretrained" if uniform else
                 "sizes differ per layer: config.greenopt_width records them; reload via rebuild_width()")
    summary = (f"width: kept ffn {step.ffn_keep:g}, heads {step.heads_keep:g} in {len(idx)} layers "
               f"(score {step.score})")
    return step_report("width", summary, model, before, touched, notes=tuple(notes))


def _activation_norms(model, step: WidthStep, idx, ctx) -> dict[str, torch.Tensor]:
    layers = decoder_layers(model)
    mods = {}
    for i in idx:
        if step.ffn_keep < 1:
            mods[f"{i}.down_proj"] = layers[i].mlp.down_proj
        if step.heads_keep < 1:
            mods[f"{i}.o_proj"] = layers[i].self_attn.o_proj
    return input_feature_norms(model, mods, ctx.calibration()) if mods else {}


def _shrink_ffn(mlp: torch.nn.Module, keep: float, x_norm: torch.Tensor | None) -> int:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    size = gate.out_features
    k = ffn_keep_count(size, keep)
    if k == size:
        return 0
    score = down.weight.float().norm(dim=0).cpu()
    if x_norm is None:
        score = score * gate.weight.float().norm(dim=1).cpu() * up.weight.float().norm(dim=1).cpu()
    else:
        score = score * x_norm
    rows = score.topk(k).indices.sort().values
    mlp.gate_proj, mlp.up_proj = _sliced(gate, rows=rows), _sliced(up, rows=rows)
    mlp.down_proj = _sliced(down, cols=rows)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = k
    return 3


def _shrink_heads(attn: torch.nn.Module, keep: float, x_norm: torch.Tensor | None) -> int:
    n_q, n_kv, hd = head_counts(attn)
    per = n_q // n_kv
    g_keep = kept_groups(n_q, n_kv, keep)
    if g_keep == n_kv:
        return 0
    col = attn.o_proj.weight.float().norm(dim=0).cpu()
    if x_norm is not None:
        col = col * x_norm
    group_score = (col ** 2).reshape(n_kv, per * hd).sum(1)
    groups = group_score.topk(g_keep).indices.sort().values
    kv_rows = (groups[:, None] * hd + torch.arange(hd)).reshape(-1)
    q_rows = (groups[:, None] * (per * hd) + torch.arange(per * hd)).reshape(-1)
    attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
    attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
    attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
    attn.o_proj = _sliced(attn.o_proj, cols=q_rows)
    for name, value in (("num_heads", g_keep * per), ("num_attention_heads", g_keep * per),
                        ("num_key_value_heads", g_keep)):
        if hasattr(attn, name):
            setattr(attn, name, value)
    return 4


def _sliced(lin: torch.nn.Linear, rows: torch.Tensor | None = None,
            cols: torch.Tensor | None = None) -> torch.nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device="meta")
    new.weight = torch.nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias.data if rows is None else lin.bias.data.index_select(0, rows.to(w.device))
        new.bias = torch.nn.Parameter(b.contiguous(), requires_grad=lin.bias.requires_grad)
    return new


def layer_sizes(layer: torch.nn.Module) -> tuple[int, int, int]:
    """(intermediate size, query heads, KV heads) of a llama-style decoder layer."""
    n_q, n_kv, _ = head_counts(layer.self_attn)
    return layer.mlp.gate_proj.out_features, n_q, n_kv


def sync_config(model: torch.nn.Module) -> bool:
    """Writes uniform layer sizes into the config, or records per-layer ones; True when uniform.

    Per-layer differences go to ``config.greenopt_width = {"version": 1, "layers": {"i":
    {"intermediate_size", "num_attention_heads", "num_key_value_heads"}}}`` for layers whose
    sizes differ from the config's.
    """
    cfg = model.config
    sizes = [layer_sizes(layer) for layer in decoder_layers(model)]
    cfg.head_dim = int(decoder_layers(model)[0].self_attn.head_dim)
    if len(set(sizes)) == 1:
        cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = sizes[0]
        if hasattr(cfg, "greenopt_width"):
            del cfg.greenopt_width
        return True
    ref = (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    cfg.greenopt_width = {"version": 1, "layers": {
        str(i): dict(zip(("intermediate_size", "num_attention_heads", "num_key_value_heads"), s))
        for i, s in enumerate(sizes) if s != ref}}
    return False


def rebuild_width(model: torch.nn.Module, meta: dict | None) -> None:
    """Re-creates per-layer sizes recorded in ``config.greenopt_width`` on a freshly built model.

    Call on a model built from the saved config (e.g. ``AutoModelForCausalLM.from_config``),
    before loading the saved state dict. New weights are uninitialised (``torch.empty``).

    Args:
        model: a llama-style model with the config's uniform sizes.
        meta: the ``greenopt_width`` dict (None or empty: nothing to do).
    """
    if not meta:
        return
    layers = decoder_layers(model)
    for i, s in meta.get("layers", {}).items():
        layer = layers[int(i)]
        mlp, attn = layer.mlp, layer.self_attn
        inter, n_q, n_kv = s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
        hd = int(attn.head_dim)
        mlp.gate_proj = _empty_like(mlp.gate_proj, mlp.gate_proj.in_features, inter)
        mlp.up_proj = _empty_like(mlp.up_proj, mlp.up_proj.in_features, inter)
        mlp.down_proj = _empty_like(mlp.down_proj, inter, mlp.down_proj.out_features)
        attn.q_proj = _empty_like(attn.q_proj, attn.q_proj.in_features, n_q * hd)
        attn.k_proj = _empty_like(attn.k_proj, attn.k_proj.in_features, n_kv * hd)
        attn.v_proj = _empty_like(attn.v_proj, attn.v_proj.in_features, n_kv * hd)
        attn.o_proj = _empty_like(attn.o_proj, n_q * hd, attn.o_proj.out_features)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter


def _empty_like(lin: torch.nn.Linear, in_f: int, out_f: int) -> torch.nn.Linear:
    return torch.nn.Linear(in_f, out_f, bias=lin.bias is not None, device=lin.weight.device,
                           dtype=lin.weight.dtype)
