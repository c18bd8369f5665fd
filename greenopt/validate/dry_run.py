"""The recipe dry run on a tiny twin.

``dry_run_issues(recipe)`` then applies the pinned variant, or a seeded sample that moves every
search dimension off its identity plus the corners of the space, to a tiny llama/mixtral with
the model's layer and head layout, and runs one forward pass after each.
"""

from __future__ import annotations

import math
import random
from typing import Any

from pydantic import ValidationError

from greenopt.compress import apply
from greenopt.config import CalibSpec, QuantizeStep, SpaceSpec, Variant, parse_layers
from greenopt.config.recipe import Recipe
from greenopt.records import Issue
from greenopt.search import space as sp
from greenopt.testing import tiny_llama, tiny_mixtral, tiny_tokenizer
from greenopt.validate.checks import len_layers, model_config

_SAMPLE_LAYERS = 8  # enough for every search dimension to move, cheap to run


def sample_variant(space: SpaceSpec, n_layers: int, seed: int) -> Variant:
    """A seeded variant with every search dimension off its identity (so every move runs)."""

    rng = random.Random(seed)
    params: dict[str, Any] = {}
    for d in sp.dims(space, n_layers):
        if d.kind == "cat":
            params[d.name] = rng.choice([c for c in d.choices if c != d.identity] or list(d.choices))
        elif d.kind == "int":
            params[d.name] = rng.randint(min(int(d.low) + 1, int(d.high)), int(d.high))
        else:
            steps = int(round((d.high - d.low) / d.step)) if d.step else 1
            grid = [round(d.low + k * d.step, 6) for k in range(steps + 1)] if d.step else [d.low, d.high]
            params[d.name] = rng.choice([g for g in grid if g != d.identity] or grid)
    return sp.build(params, space, n_layers)


def corner_params(space: SpaceSpec, n_layers: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, parameters) for the corners of the space, each a few dimensions at an extreme:
    the deepest cut with every layer group quantized (uniformly, and alternating with 16-bit
    groups so per-group overrides exist) for each method, the narrowest FFN, each head
    fraction, each MoE split, the fewest experts, and each pruning pattern at its densest cut."""

    by = {d.name: d for d in sp.dims(space, n_layers)}
    out: list[tuple[str, dict[str, Any]]] = []
    bit_dims = [n for n in by if n.startswith("bits.g")]
    depth = {"depth.drop": int(by["depth.drop"].high)} if "depth.drop" in by else {}
    cut = f"depth.drop={depth['depth.drop']}, " if depth else ""
    if bit_dims:
        low = min(b for b in by[bit_dims[0]].choices if b != 16)
        high = max(b for b in by[bit_dims[0]].choices if b != 16)
        head = {"bits.lm_head": min(b for b in by["bits.lm_head"].choices if b != 16)} if "bits.lm_head" in by else {}
        for method in by["quant.method"].choices if "quant.method" in by else (None,):
            m = {"quant.method": method} if method else {}
            tag = f" ({method})" if method else ""
            out.append((f"{cut}every group at {low} bits{tag}", {**depth, **m, **head, **{n: low for n in bit_dims}}))
            for first in (0, 1):
                out.append((f"{cut}groups alternating {low}/{high if high != low else 16} bits{tag}",
                            {**depth, **m, **{n: low if (k + first) % 2 == 0 else (high if high != low else 16)
                                              for k, n in enumerate(bit_dims)}}))
    elif depth:
        out.append((cut.rstrip(", "), depth))
    if "width.ffn_keep" in by:
        out.append((f"width.ffn_keep={by['width.ffn_keep'].low}", {"width.ffn_keep": by["width.ffn_keep"].low}))
    for h in by["width.heads_keep"].choices[1:] if "width.heads_keep" in by else ():
        out.append((f"width.heads_keep={h}", {"width.heads_keep": h}))
    for e in by["moefy.experts"].choices[1:] if "moefy.experts" in by else ():
        k = max((k for k in by["moefy.top_k"].choices if k <= e), default=min(by["moefy.top_k"].choices))
        out.append((f"moefy.experts={e}, top_k={k}", {"moefy.experts": e, "moefy.top_k": k}))
    if "experts.keep" in by:
        out.append((f"experts.keep={by['experts.keep'].low}", {"experts.keep": by["experts.keep"].low}))
    for pattern in by["prune"].choices[1:] if "prune" in by else ():
        extra = {"prune.sparsity": by["prune.sparsity"].high} if "prune.sparsity" in by and pattern == "unstructured" else {}
        out.append((f"prune={pattern}", {"prune": pattern, **extra}))
    return out


def _layers_needed(variant: Variant) -> int:
    """Decoder layers a twin needs so every layer index and depth cut of ``variant`` exists.

    Steps apply in order, so a step's layer indices count the layers that remain after the
    depth cuts before it: the layers those cuts removed are added back.
    """

    need, removed = 4, 0
    for s in variant.steps:
        specs = [getattr(s, "layers", None)]
        for t in [getattr(s, "target", None), *(o.target for o in getattr(s, "overrides", ()))]:
            specs.append(t.layers if t is not None else None)
        for spec in filter(None, specs):
            need = max(need, removed + max(parse_layers(spec), default=0) + 1)
        if s.kind == "depth":
            cut = len(set(parse_layers(s.layers))) if s.layers else s.drop
            need = max(need, removed + cut + 2)  # depth keeps the first and last layer
            removed += cut
    return need


def _twin_groups(variant: Variant) -> Variant:
    """The variant with packed/torchao group sizes cut to divide 8 (the twin's width unit).

    Group sizes were already checked against the real architecture; bitsandbytes block sizes
    stay as they are, and the twin's widths are made multiples of them (``_twin_unit``).
    """
    def fit(method: str, g: int | None) -> int | None:
        return g if g is None or method.startswith("bnb_") else math.gcd(g, 8)

    steps = []
    for s in variant.steps:
        if isinstance(s, QuantizeStep):
            ovs = tuple(o.model_copy(update={"group_size": fit(o.method or s.method, o.group_size)})
                        for o in s.overrides)
            s = s.model_copy(update={"group_size": fit(s.method, s.group_size), "overrides": ovs})
        steps.append(s)
    return Variant.model_validate({**variant.model_dump(), "steps": [x.model_dump() for x in steps]})


_BNB_DEFAULT_BLOCK = 64


def _twin_unit(variants: list[Variant]) -> int:
    """The width every quantized input dimension of the twin must be a multiple of: 8, and each
    bitsandbytes 4-bit block size (its CPU kernel blocks each row, so a row shorter than a block,
    as on a twin, fails where the real model's widths do not)."""
    unit = 8
    for v in variants:
        for s in v.steps:
            if not isinstance(s, QuantizeStep):
                continue
            for method, bits, g in [(s.method, s.bits, s.group_size),
                                    *((o.method or s.method, o.bits or s.bits,
                                       o.group_size if o.group_size is not None else s.group_size)
                                      for o in s.overrides)]:
                if method.startswith("bnb_") and method != "bnb_int8" and bits != 16:
                    unit = math.lcm(unit, g or _BNB_DEFAULT_BLOCK)
    return unit


def _denominator(x: float) -> int:
    from fractions import Fraction

    return Fraction(x).limit_denominator(64).denominator


def tiny_twin(cfg: Any, layers: int, experts: list[int], unit: int = 8,
              keeps: tuple[float, ...] = (), heads_keeps: tuple[float, ...] = ()) -> Any:
    """A tiny seeded model with ``layers`` decoder layers and ``cfg``'s head layout (llama) or
    experts (mixtral); a tiny GQA layout that can take every fraction in ``heads_keeps`` when
    ``cfg`` is None.

    Widths are multiples of ``unit`` wherever a variant can cut them: the head dimension so
    that every whole KV group (and so every head cut) spans a multiple of ``unit``, and the FFN
    so that every ``keeps`` fraction of it, and every MoE split of it, does.
    """

    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    ffn_unit = math.lcm(unit, 8 * math.lcm(1, *experts))
    inter = 2 * ffn_unit * math.lcm(1, *(_denominator(k) for k in keeps))
    moe = getattr(text, "num_local_experts", None)
    if moe:
        return tiny_mixtral(layers=layers, hidden=math.lcm(64, unit), intermediate=inter, experts=int(moe),
                            top_k=int(getattr(text, "num_experts_per_tok", 2)))
    if text is not None:
        heads = int(getattr(text, "num_attention_heads", 4) or 4)
        kv = int(getattr(text, "num_key_value_heads", None) or heads)
    else:
        kv = math.lcm(2, *(_denominator(h) for h in heads_keeps))
        heads = 2 * kv
    per = max(1, heads // kv)
    head_dim = math.lcm(8, unit // math.gcd(unit, per))  # per x head_dim is a multiple of unit
    return tiny_llama(layers=layers, hidden=heads * head_dim, intermediate=inter, heads=heads, kv_heads=kv,
                      tie_embeddings=bool(getattr(text, "tie_word_embeddings", True)))


def dry_run_issues(r: Recipe) -> tuple[list[Issue], list[str]]:
    """Applies variants to a tiny twin of the model and runs a forward pass after each.

    A pinned variant runs on a twin with the model's layer count (as many as its indices need
    when the config is unknown). A search runs, on a twin of at most 8 layers (the real depth
    was covered by the meta-device checks), its seeded sample that moves every dimension and
    the corners of the space (``corner_params``). Everything is seeded: the same recipe always
    runs the same variants on the same twins.

    Returns:
        (issues, notes): an issue for each variant that fails to apply or run, and a note of
        what ran.
    """
    import torch


    cfg, _, _ = model_config(r.model)
    path = "variant" if r.variant is not None else "search.space"
    cases: list[tuple[str, Variant]] = []
    issues: list[Issue] = []
    if r.variant is not None:
        cases.append(("", r.variant))
        n_layers = len_layers(cfg) if cfg is not None else 0
    else:
        space = r.search.space  # type: ignore[union-attr]
        n_layers = min(len_layers(cfg), _SAMPLE_LAYERS) if cfg is not None else _SAMPLE_LAYERS
        try:
            cases.append(("seeded sample", sample_variant(space, n_layers, r.search.seed)))  # type: ignore[union-attr]
        except (ValueError, ValidationError) as e:
            issues.append(Issue(path=path, message=f"cannot sample a variant: {str(e).splitlines()[0]}"))
        for label, params in corner_params(space, n_layers):
            try:
                cases.append((label, sp.build(params, space, n_layers)))
            except (ValueError, ValidationError) as e:
                issues.append(Issue(path=path, message=f"cannot build the corner {label}: {str(e).splitlines()[0]}"))
    seen: set[str] = set()
    twins: set[int] = set()
    ran: list[str] = []
    for label, variant in cases:
        if variant.hash in seen:
            continue
        seen.add(variant.hash)
        twin = _twin_groups(variant)
        layers = n_layers if (r.variant is not None and cfg is not None) else max(n_layers, _layers_needed(twin))
        found, n_twin = _run_on_twin(cfg, twin, layers, r.calibration.seed, torch)
        twins.add(n_twin)
        where = f" ({label})" if label else ""
        if found:
            issues.append(Issue(path=path, message=f"dry run failed on a tiny {n_twin}-layer twin{where}: {found}"))
        else:
            ran.append(f"{', '.join(s.kind for s in variant.steps) or 'baseline'} ({variant.hash})")
    if issues:
        return issues, []
    sizes = "/".join(map(str, sorted(twins)))
    if r.variant is not None:
        return [], [f"dry run: {ran[0]} applied to a tiny {sizes}-layer twin"]
    return [], [f"dry run: {len(ran)} variants (the seeded sample {ran[0]} and the corners of the space) "
                f"applied to a tiny {sizes}-layer twin"]


def _run_on_twin(cfg: Any, variant: Variant, layers: int, seed: int, torch: Any) -> tuple[str, int]:
    """('' or what failed, twin layers) for applying ``variant`` and one forward pass."""

    experts = [s.experts for s in variant.steps if s.kind == "moefy"]
    keeps = tuple(s.ffn_keep for s in variant.steps if s.kind == "width")
    heads = tuple(s.heads_keep for s in variant.steps if s.kind == "width")
    model = tiny_twin(cfg, layers, experts, unit=_twin_unit([variant]), keeps=keeps, heads_keeps=heads)
    n_twin = len(model.model.layers)
    calib = CalibSpec(samples=4, seq_len=32, seed=seed)
    try:
        apply(model, variant, tokenizer=tiny_tokenizer(), calib=calib)
        with torch.inference_mode():
            logits = model(torch.arange(1, 17).unsqueeze(0)).logits
    except Exception as e:  # noqa: BLE001 - whatever stops the variant from running is the finding
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}", n_twin
    if not torch.isfinite(logits).all():
        return "the variant gives non-finite logits", n_twin
    return "", n_twin
