"""The search space: Optuna parameters <-> a Variant.

``sample(trial, spec, num_layers)`` suggests every parameter of the space (the set of
parameters is fixed for a given spec, so NSGA-II's crossover sees one search space) and
builds the Variant they describe. The Variant is a pure function of the parameters, and
parameters that do not matter (a sparsity when pruning is off) do not change it, so the
variant hash identifies what was run and repeated variants hit the cache.

Example:
    >>> import optuna
    >>> from greenopt.config import SpaceSpec
    >>> from greenopt.search.space import baseline_params, build, sample
    >>> spec = SpaceSpec()
    >>> build(baseline_params(spec, 30), spec, 30).is_baseline
    True
    >>> study = optuna.create_study(directions=["maximize", "minimize"])
    >>> variant = sample(study.ask(), spec, 30)   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from greenopt.config import (
    Deploy,
    DepthStep,
    ExpertPruneStep,
    HealStep,
    MoefyStep,
    PruneStep,
    QuantizeStep,
    QuantOverride,
    SpaceSpec,
    Target,
    Variant,
    WidthStep,
)
from greenopt.runtimes.gptq_export import GPTQ_BITS

log = logging.getLogger(__name__)

_PARTS = {"attn": ("*self_attn*",), "ffn": ("*mlp*",), "all": ("*",)}
_EMBEDDING = ("*embed_tokens",)  # llama/mistral/qwen-style input embedding


@dataclass(frozen=True)
class Dim:
    """One search dimension: ``kind`` is categorical, int or float; ``identity`` is its no-op value."""

    name: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    identity: Any = None


def dims(spec: SpaceSpec, num_layers: int) -> list[Dim]:
    """The dimensions of ``spec`` for a model with ``num_layers`` decoder layers, in a fixed order."""
    out: list[Dim] = []
    bits = tuple(sorted(set(spec.bits) | {16}, reverse=True))
    if len(bits) > 1:
        parts = ("attn", "ffn") if spec.split_attn_ffn else ("all",)
        for g in range(spec.layer_groups):
            out += [Dim(f"bits.g{g}.{p}", "cat", bits, identity=16) for p in parts]
        if len(spec.methods) > 1:
            out.append(Dim("quant.method", "cat", tuple(spec.methods), identity=spec.methods[0]))
    for name, widths in (("bits.lm_head", spec.lm_head_bits), ("bits.embedding", spec.embedding_bits)):
        choices = tuple(sorted(set(widths) | {16}, reverse=True))
        if len(choices) > 1:
            out.append(Dim(name, "cat", choices, identity=16))
    if spec.prune:
        out.append(Dim("prune", "cat", ("none",) + tuple(dict.fromkeys(spec.prune)), identity="none"))
        if "unstructured" in spec.prune and spec.sparsity[1] > spec.sparsity[0]:
            out.append(Dim("prune.sparsity", "float", low=spec.sparsity[0], high=spec.sparsity[1],
                           step=0.05, identity=spec.sparsity[0]))
    max_drop = min(int(spec.depth_drop_max * num_layers), num_layers - 2)  # depth keeps first and last
    if max_drop > 0:
        out.append(Dim("depth.drop", "int", low=0, high=max_drop, identity=0))
    if spec.heads_keep:
        out.append(Dim("width.heads_keep", "cat", (1.0,) + spec.heads_keep, identity=1.0))
    for name, lo in (("width.ffn_keep", spec.ffn_keep_min), ("experts.keep", spec.expert_keep_min)):
        low = _grid_low(lo, spec.keep_step)
        if low < 1.0:
            out.append(Dim(name, "float", low=low, high=1.0, step=spec.keep_step, identity=1.0))
    if spec.moefy_experts:
        out.append(Dim("moefy.experts", "cat", (0,) + spec.moefy_experts, identity=0))
        out.append(Dim("moefy.top_k", "cat", spec.moefy_top_k, identity=spec.moefy_top_k[0]))
    if spec.heal is not None:
        out.append(Dim("heal", "cat", (False, True), identity=False))
    return out + _deploy_dims(spec)


def _deploy_dims(spec: SpaceSpec) -> list[Dim]:
    out: list[Dim] = []
    if spec.dtypes:
        out.append(Dim("deploy.dtype", "cat", ("auto",) + spec.dtypes, identity="auto"))
    if True in spec.compile:
        out.append(Dim("deploy.compile", "cat", (False, True), identity=False))
    if spec.runtimes:
        out.append(Dim("deploy.runtime", "cat", ("transformers",) + spec.runtimes, identity="transformers"))
    if "llama.cpp" in spec.runtimes and len(spec.llamacpp_weights) > 1:
        out.append(Dim("deploy.llamacpp_weights", "cat", spec.llamacpp_weights, identity=spec.llamacpp_weights[0]))
    if "onnxruntime-genai" in spec.runtimes:
        weights = tuple(dict.fromkeys(("dense",) + spec.runtime_weights))
        if len(weights) > 1:
            out.append(Dim("deploy.weights", "cat", weights, identity=weights[-1]))
        for name, choices in (("deploy.block_size", spec.block_sizes), ("deploy.accuracy_level", spec.accuracy_levels)):
            if len(choices) > 1:
                out.append(Dim(name, "cat", choices, identity=choices[0]))
        if len(spec.ort_codes) > 1 and set(weights) - {"dense"}:
            out.append(Dim("deploy.ort_codes", "cat", spec.ort_codes, identity=spec.ort_codes[0]))
    return out


def _grid_low(lo: float, step: float) -> float:
    # The lowest grid point 1 - k*step that is >= lo (so 1.0 stays on the grid).
    k = int((1.0 - lo) / step + 1e-9)
    return round(1.0 - k * step, 6)


def baseline_params(spec: SpaceSpec, num_layers: int) -> dict[str, Any]:
    """Parameters that build the empty variant (for ``study.enqueue_trial``)."""
    return {d.name: d.identity for d in dims(spec, num_layers)}


def single_moves(spec: SpaceSpec, num_layers: int) -> list[dict[str, Any]]:
    """Each move of the space alone, as a user would try it by hand, mildest first.

    For the search's warm start (``SearchSpec.warm_start``): uniform quantization at each
    bit width and method, the head (with a tied embedding) and an untied embedding at each
    bit width, each pruning pattern at its middle sparsity, an eighth and a quarter
    of the layers dropped, an FFN kept at 75%, each head fraction, and each MoE split with its
    largest top-k, each compute dtype, and each runtime with its own weight format. Values are snapped to the space's grid; each dict builds a one-move Variant.
    """
    by_name = {d.name: d for d in dims(spec, num_layers)}
    base = baseline_params(spec, num_layers)
    out: list[dict[str, Any]] = []

    def add(**change: Any) -> None:
        p = {**base, **change}
        if p != base and p not in out:
            out.append(p)

    bit_dims = [n for n in by_name if n.startswith("bits.g")]
    methods = by_name["quant.method"].choices if "quant.method" in by_name else (None,)
    for bits in (b for b in by_name[bit_dims[0]].choices if b != 16) if bit_dims else ():
        for m in methods:
            add(**{n: bits for n in bit_dims}, **({"quant.method": m} if m else {}))
    for name in ("bits.lm_head", "bits.embedding"):
        for bits in by_name[name].choices[1:] if name in by_name else ():
            add(**{name: bits})
    if "prune" in by_name:
        mid = by_name.get("prune.sparsity")
        for pattern in by_name["prune"].choices[1:]:
            extra = {"prune.sparsity": _snap(mid, (mid.low + mid.high) / 2)} if mid and pattern == "unstructured" else {}
            add(prune=pattern, **extra)
    if "depth.drop" in by_name:
        hi = int(by_name["depth.drop"].high)
        for frac in (0.125, 0.25):
            add(**{"depth.drop": min(hi, max(1, round(num_layers * frac)))})
    if "width.ffn_keep" in by_name:
        add(**{"width.ffn_keep": _snap(by_name["width.ffn_keep"], 0.75)})
    for h in by_name["width.heads_keep"].choices[1:2] if "width.heads_keep" in by_name else ():
        add(**{"width.heads_keep": h})
    if "moefy.experts" in by_name:
        for e in by_name["moefy.experts"].choices[1:]:
            add(**{"moefy.experts": e, "moefy.top_k": max(k for k in by_name["moefy.top_k"].choices if k <= e)})
    if "experts.keep" in by_name:
        add(**{"experts.keep": _snap(by_name["experts.keep"], 0.75)})
    for dtype in by_name["deploy.dtype"].choices[1:] if "deploy.dtype" in by_name else ():
        add(**{"deploy.dtype": dtype})
    if "deploy.compile" in by_name:
        add(**{"deploy.compile": True})
    for runtime in by_name["deploy.runtime"].choices[1:] if "deploy.runtime" in by_name else ():
        add(**{"deploy.runtime": runtime})
    return out


def _snap(d: Dim, x: float) -> float:
    k = round((x - d.low) / d.step) if d.step else 0
    return _r(min(d.high, max(d.low, d.low + k * (d.step or 0))))


def suggest(trial: Any, spec: SpaceSpec, num_layers: int) -> dict[str, Any]:
    """Suggests every dimension on an Optuna trial; returns name -> value."""
    params: dict[str, Any] = {}
    for d in dims(spec, num_layers):
        if d.kind == "cat":
            params[d.name] = trial.suggest_categorical(d.name, d.choices)
        elif d.kind == "int":
            params[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high))
        else:
            params[d.name] = trial.suggest_float(d.name, d.low, d.high, step=d.step)
    return params


def sample(trial: Any, spec: SpaceSpec, num_layers: int) -> Variant:
    """Suggests the trial's parameters and returns the Variant they describe.

    Args:
        trial: an ``optuna.Trial`` (enqueued parameters are honoured).
        spec: the search space.
        num_layers: decoder layers of the model being searched.

    Returns:
        The Variant; the same parameters always give the same Variant (and hash).
    """
    return build(suggest(trial, spec, num_layers), spec, num_layers)


def build(params: dict[str, Any], spec: SpaceSpec, num_layers: int) -> Variant:
    """Builds the Variant for a parameter dict (missing dimensions take their identity).

    Steps run structural moves first (depth, width, MoE), then pruning, then the space's heal
    step when it is sampled on and one of those moves is there, then quantization, whose layer
    groups are computed over the layers that remain after the depth cut.

    Raises:
        ValueError: a parameter value outside what the space allows.
    """
    p = {**baseline_params(spec, num_layers), **params}
    steps: list[Any] = []
    drop = int(p.get("depth.drop", 0))
    if drop:
        steps.append(DepthStep(drop=drop))
    ffn, heads = _r(p.get("width.ffn_keep", 1.0)), _r(p.get("width.heads_keep", 1.0))
    if ffn < 1.0 or heads < 1.0:
        steps.append(WidthStep(ffn_keep=ffn, heads_keep=heads))
    experts = int(p.get("moefy.experts", 0))
    if experts:
        steps.append(MoefyStep(experts=experts, top_k=min(int(p["moefy.top_k"]), experts)))
    keep = _r(p.get("experts.keep", 1.0))
    if keep < 1.0:
        steps.append(ExpertPruneStep(keep=keep))
    pattern = p.get("prune", "none")
    if pattern != "none":
        sparsity = 0.5 if pattern == "2:4" else _r(p.get("prune.sparsity", spec.sparsity[0]))
        steps.append(PruneStep(method=spec.prune_method, pattern=pattern, sparsity=sparsity))
    steps += _quantize_steps(p, spec, num_layers - drop, ffn_dense=not experts)
    deploy = _deploy(p, spec)
    if deploy.runtime != "transformers":  # it reads ordinary checkpoints: its own weight format replaces
        steps = [s for s in steps if isinstance(s, _PLAIN_STEPS)]  # quantize steps; MoE splits are not sampled
    if spec.heal is not None and p.get("heal", False) and any(isinstance(s, _HEALABLE) for s in steps):
        cut = next((i for i, s in enumerate(steps) if isinstance(s, QuantizeStep)), len(steps))
        steps.insert(cut, spec.heal)  # heal, then quantize
    return Variant(steps=tuple(steps + _imported_codes(p, spec, deploy)), deploy=deploy)


def _imported_codes(p: dict[str, Any], spec: SpaceSpec, deploy: Deploy) -> list[QuantizeStep]:
    # greenopt's codes of every decoder Linear, imported by onnxruntime-genai as a GPTQ checkpoint
    codes = p.get("deploy.ort_codes", spec.ort_codes[0])
    if deploy.runtime != "onnxruntime-genai" or deploy.weights == "dense" or codes == "builder":
        return []
    return [QuantizeStep(method=codes, bits=_IMPORT_BITS[deploy.weights], group_size=deploy.block_size)]


_PLAIN_STEPS = (DepthStep, WidthStep, PruneStep, HealStep)
_HEALABLE = (DepthStep, WidthStep, MoefyStep, ExpertPruneStep, PruneStep)  # moves a heal can recover from
_IMPORT_BITS = {weights: bits for bits, weights in GPTQ_BITS.items()}  # the builder imports these widths


def _deploy(p: dict[str, Any], spec: SpaceSpec) -> Deploy:
    runtime = p.get("deploy.runtime", "transformers")
    if runtime == "transformers":
        return Deploy(dtype=p.get("deploy.dtype", "auto"), compile=bool(p.get("deploy.compile", False)))
    if runtime == "llama.cpp":
        return Deploy(runtime=runtime, weights=p.get("deploy.llamacpp_weights", spec.llamacpp_weights[0]))
    return Deploy(runtime=runtime, weights=p.get("deploy.weights", spec.runtime_weights[-1]),
                  block_size=p.get("deploy.block_size", spec.block_sizes[0]),
                  accuracy_level=p.get("deploy.accuracy_level", spec.accuracy_levels[0]))


def not_sampled(spec: SpaceSpec) -> list[str]:
    """What the space's runtimes do not sample, one line each (for the dry run and recipe validate)."""
    def formats(r: str) -> str:
        own = spec.llamacpp_weights if r == "llama.cpp" else spec.runtime_weights
        return "/".join(w for w in own if w != "dense") or "dense"

    def imported(r: str) -> str:
        codes = [c for c in spec.ort_codes if c != "builder"]
        if r != "onnxruntime-genai" or not codes:
            return ""
        return f", and greenopt's {'/'.join(codes)} codes of every decoder Linear in place of the builder's"

    return [f"{r}: quantize and MoE moves are not sampled for it (it reads ordinary checkpoints and "
            f"quantizes with its own {formats(r)} weights); depth, width, prune and heal moves are{imported(r)}"
            for r in spec.runtimes]


def _r(x: float) -> float:
    return round(float(x), 4)


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous (first, last) layer ranges splitting ``num_layers`` into up to ``groups`` parts."""
    n = max(1, min(groups, num_layers))
    size, extra = divmod(num_layers, n)
    out, start = [], 0
    for g in range(n):
        end = start + size + (1 if g < extra else 0)
        out.append((start, end - 1))
        start = end
    return out


def _quantize_steps(p: dict[str, Any], spec: SpaceSpec, num_layers: int,
                    ffn_dense: bool = True) -> list[QuantizeStep]:
    # A MoEfied FFN has no Linear layers left to quantize: its groups stay at 16 bits.
    parts = ("attn", "ffn") if spec.split_attn_ffn or not ffn_dense else ("all",)
    method = p.get("quant.method", spec.methods[0])
    assigned: list[tuple[Target, int]] = []
    for g, (a, b) in enumerate(layer_groups(num_layers, spec.layer_groups)):
        layers = f"{a}-{b}" if b > a else str(a)
        for part in parts:
            key = f"bits.g{g}.{part if spec.split_attn_ffn else 'all'}"
            bits = 16 if part == "ffn" and not ffn_dense else int(p.get(key, 16))
            assigned.append((Target(include=_PARTS[part], layers=layers), bits))
    steps: list[QuantizeStep] = []
    if any(bits != 16 for _, bits in assigned):
        counts = Counter(bits for _, bits in assigned)
        base = max(counts, key=lambda b: (counts[b], b))  # most common width; ties -> more bits
        overrides = tuple(QuantOverride(target=t, bits=bits) for t, bits in assigned if bits != base)
        steps.append(QuantizeStep(method=method, bits=base, group_size=spec.group_size, overrides=overrides))
    head = int(p.get("bits.lm_head", 16))
    if head != 16:  # on a tied model this quantizes the embedding too: one tensor (compress.q_tied)
        steps.append(QuantizeStep(method=method, bits=head, group_size=spec.group_size,
                                  target=Target(include=("lm_head",), exclude=())))
    embedding = int(p.get("bits.embedding", 16))
    if embedding != 16:  # embeddings are quantized by rtn only
        steps.append(QuantizeStep(method="rtn", bits=embedding, group_size=spec.group_size,
                                  target=Target(include=_EMBEDDING, exclude=())))
    return steps


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def ties_embeddings(config: Any) -> bool:
    """Whether a model config says its input embedding and lm_head are one tensor."""
    text = _text_config(config)
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


def space_for_model(space: SpaceSpec, config: Any) -> tuple[SpaceSpec, dict[str, str]]:
    """``space`` without the dimensions that do not apply to a model, and ``{left-out field: why}``.

    On a tied model (``tie_word_embeddings``) the input embedding is the head's tensor:
    ``bits.lm_head`` quantizes both at once, so ``embedding_bits`` is left out. Imported
    onnxruntime-genai codes (``ort_codes``) are left out when a sampled block size does not
    divide the decoder Linears' input widths (the codes' groups become the blocks).

    Args:
        space: the requested space.
        config: the model's transformers config.

    Returns:
        The narrowed space and the reasons (empty when every dimension applies).
    """
    left_out: dict[str, str] = {}
    if set(space.embedding_bits) - {16} and ties_embeddings(config):
        left_out["embedding_bits"] = ("the model ties its input embedding to lm_head (tie_word_embeddings): one "
                                      "tensor, quantized with the head by lm_head_bits")
    widths = _linear_inputs(config)
    blocks = [b for b in space.block_sizes if widths and any(w % b for w in widths)]
    if set(space.ort_codes) - {"builder"} and "onnxruntime-genai" in space.runtimes and blocks:
        left_out["ort_codes"] = (f"block_size {'/'.join(map(str, blocks))} does not divide the decoder Linears' "
                                 f"{'/'.join(map(str, widths))} input features, and imported codes keep their groups "
                                 "as MatMulNBits blocks; sample block sizes that divide them")
    for choice, why in left_out.items():
        log.warning("left out of the search space: %s: %s", choice, why)
    update = {"embedding_bits": (16,)} if "embedding_bits" in left_out else {}
    if "ort_codes" in left_out:
        update["ort_codes"] = ("builder",)
    return (space.model_copy(update=update) if update else space), left_out


def _linear_inputs(config: Any) -> tuple[int, ...]:
    """The decoder Linears' input widths a llama-like config gives (hidden, intermediate), or ()."""
    text = _text_config(config)
    widths = (getattr(text, "hidden_size", None), getattr(text, "intermediate_size", None))
    return tuple(sorted({w for w in widths if isinstance(w, int)}))
