"""The ``quantize`` step: weight quantization of Linear (and embedding) modules, per layer.

Which modules: the step's ``target`` (default: every Linear except ``lm_head`` and
embeddings), plus any module an override's target names. Each module takes its settings from
the first override whose target matches it, else from the step; ``bits=16`` leaves it
untouched. Embeddings are candidates only when a pattern other than ``*`` names them. Methods and their backends:

=============  ============  =======================================================
method         bits          backend
=============  ============  =======================================================
rtn            8, 4, 3, 2    greenopt round-to-nearest, packed (also embeddings)
gptq           8, 4, 3, 2    greenopt GPTQ on the calibration sample, packed
hqq            8, 4, 3, 2    ``hqq`` optimizer, packed
bnb_int8       8             bitsandbytes LLM.int8 (``threshold``; 0 = pure int8)
bnb_nf4/fp4    4             bitsandbytes 4-bit, ``group_size`` = block size
torchao_int8   8             torchao int8 weight-only
=============  ============  =======================================================

A tied ``lm_head`` and input embedding (one shared weight, ``tie_word_embeddings``) stay tied:
when the step quantizes either or both with rtn or hqq, the shared weight is quantized once into
one packed tensor that serves both (:mod:`greenopt.compress.q_tied`), so the model and its
checkpoint shrink. Other methods cannot serve an embedding lookup: the head is untied from the
dense embedding (the model grows; the step's notes say so, and the config says untied).
Everything is checked before any work (:func:`check`).

Example:
    >>> from greenopt.config import QuantizeStep, QuantOverride, Target, Variant
    >>> step = QuantizeStep(method="rtn", bits=4, group_size=64, overrides=(
    ...     QuantOverride(target=Target(layers="0,29"), bits=8),
    ...     QuantOverride(target=Target(include=("lm_head",)), bits=8)))
    >>> report = apply(model, Variant(steps=[step]))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections import Counter
from dataclasses import dataclass

import torch

from greenopt.compress import snapshot, step_report
from greenopt.compress.q_bnb import problem
from greenopt.compress.q_tied import TIED_METHODS, quantize_pair
from greenopt.compress.targeting import decoder_layers, in_target, layer_index
from greenopt.config import QuantizeStep, Target
from greenopt.errors import MoveError
from greenopt.records import StepReport

log = logging.getLogger(__name__)

# method -> (backend module, pip requirement that provides it)
BACKENDS: dict[str, tuple[str, str | None]] = {
    "rtn": ("greenopt.compress.q_rtn", None),
    "gptq": ("greenopt.compress.q_gptq", None),
    "hqq": ("greenopt.compress.q_hqq", "hqq==0.2.8.post1"),
    "bnb_int8": ("greenopt.compress.q_bnb", "bitsandbytes==0.50.2"),
    "bnb_nf4": ("greenopt.compress.q_bnb", "bitsandbytes==0.50.2"),
    "bnb_fp4": ("greenopt.compress.q_bnb", "bitsandbytes==0.50.2"),
    "torchao_int8": ("greenopt.compress.q_torchao", "torchao==0.18.0"),
}
BITS = {"rtn": (8, 4, 3, 2), "gptq": (8, 4, 3, 2), "hqq": (8, 4, 3, 2), "bnb_int8": (8,),
         "bnb_nf4": (4,), "bnb_fp4": (4,), "torchao_int8": (8,)}
_PACKED = ("rtn", "gptq", "hqq")
_ORDER = ("rtn", "hqq", "bnb_int8", "bnb_nf4", "bnb_fp4", "torchao_int8", "gptq")  # gptq last: it sees the rest


@dataclass
class Planned:
    """One module to quantize and how."""

    name: str
    module: torch.nn.Module
    method: str
    bits: int
    group_size: int | None  # resolved: a divisor of the input width for packed methods


@dataclass(frozen=True)
class TiedPair:
    """An input embedding and a head that share one weight, quantized once for both."""

    embedding: str
    head: str
    method: str
    bits: int
    group_size: int


def _eligible(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and getattr(m, "greenopt_bits", None) is None]


def _hits(name: str, mod: torch.nn.Module, target: Target) -> bool:
    # Embeddings only when a pattern other than "*" names them (other models call them wte/wpe).
    if isinstance(mod, torch.nn.Embedding):
        target = target.model_copy(update={"include": tuple(p for p in target.include if p != "*")})
    return in_target(name, target)


def _where(target: Target) -> str:
    return str(target.model_dump(exclude_defaults=True) or "default")


def plan(model: torch.nn.Module, step: QuantizeStep) -> tuple[list[Planned], list[str]]:
    """Resolves the step into (modules to quantize, names left at 16 bits). No work is done.

    Raises:
        MoveError: a target or override matches nothing, or a module cannot take its settings.
    """
    eligible = _eligible(model)
    if not any(_hits(n, m, step.target) for n, m in eligible):
        raise MoveError(f"quantize: target {_where(step.target)} matches no unquantized Linear/Embedding "
                        "module; check include/exclude patterns and layers")
    for k, ov in enumerate(step.overrides):
        if not any(_hits(n, m, ov.target) for n, m in eligible):
            raise MoveError(f"quantize: overrides[{k}] target {_where(ov.target)} matches no unquantized "
                            "Linear/Embedding module; check its patterns and layers")
    planned, kept = [], []
    for name, mod in eligible:
        ov = next((o for o in step.overrides if _hits(name, mod, o.target)), None)
        if ov is None and not _hits(name, mod, step.target):
            continue
        bits = ov.bits if ov and ov.bits is not None else step.bits
        if bits == 16:
            kept.append(name)
            continue
        method = ov.method if ov and ov.method is not None else step.method
        gs = ov.group_size if ov and ov.group_size is not None else step.group_size
        planned.append(Planned(name, mod, method, bits, _resolve(name, mod, method, bits, gs)))
    return planned, kept


def _resolve(name: str, mod: torch.nn.Module, method: str, bits: int, gs: int | None) -> int | None:
    if method not in BACKENDS:
        raise MoveError(f"quantize: unknown method {method!r}; choose one of {', '.join(BACKENDS)}")
    if bits not in BITS[method]:
        raise MoveError(f"quantize: {name}: {method} supports {'/'.join(map(str, BITS[method]))} bits, "
                        f"not {bits}; give this module an override with method rtn, hqq or gptq")
    if isinstance(mod, torch.nn.Embedding) and method != "rtn":
        raise MoveError(f"quantize: {name} is an embedding; only method rtn quantizes embeddings "
                        "(add an override with method: rtn for it)")
    if not mod.weight.is_floating_point():
        raise MoveError(f"quantize: {name} has {mod.weight.dtype} weights; quantize a floating-point model")
    width = mod.embedding_dim if isinstance(mod, torch.nn.Embedding) else mod.in_features
    if method.startswith("bnb_"):

        msg = problem(method, mod, bits, gs)
        if msg:
            raise MoveError(f"quantize: {name}: {msg}")
        return gs
    if gs is not None and width % gs:
        near = sorted((d for d in range(8, width + 1, 8) if width % d == 0), key=lambda d: abs(d - gs))[:3]
        raise MoveError(f"quantize: group_size {gs} does not divide {name}'s {width} input features; "
                        f"pick a divisor such as {', '.join(map(str, sorted(near)))} or override this module")
    if method in _PACKED:
        return gs or width
    return gs


def check(model: torch.nn.Module, step: QuantizeStep, ctx) -> None:
    """Raises MoveError if the step cannot apply as configured; does no work."""
    planned, kept = plan(model, step)
    if not planned:
        raise MoveError("quantize: every targeted module is overridden to 16 bits; nothing to quantize")
    _tied_pairs(model, planned, kept)
    for method in sorted({p.method for p in planned}):
        req = BACKENDS[method][1]
        if req and importlib.util.find_spec(req.split("==")[0].replace("-", "_")) is None:
            raise MoveError(f"quantize: method {method} needs {req.split('==')[0]}; pip install {req}")
    gptq = [p for p in planned if p.method == "gptq"]
    if gptq:
        if getattr(ctx, "tokenizer", None) is None:
            raise MoveError("quantize: method gptq needs calibration data; pass tokenizer= to apply()")
        if any(layer_index(p.name) is not None for p in gptq):
            decoder_layers(model)


def _sharers(model: torch.nn.Module) -> dict[int, list[tuple[str, torch.nn.Module]]]:
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.nn.Parameter) and n:
            owners.setdefault(id(w), []).append((n, m))
    return owners


def _tied_pairs(model: torch.nn.Module, planned: list[Planned], kept: list[str]) -> list[TiedPair]:
    """The tied embedding/head pairs the step quantizes with a method both can share (rtn, hqq).

    A pair quantized with another method is not returned: :func:`_untie` splits it, as before.

    Raises:
        MoveError: one of a tied pair is kept at 16 bits while the other is quantized, or the two
            are given different settings (they are one tensor).
    """
    by_name = {p.name: p for p in planned}
    pairs = []
    for group in _sharers(model).values():
        pair = sorted(group, key=lambda nm: not isinstance(nm[1], torch.nn.Embedding))  # embedding first
        if len(pair) != 2 or not (isinstance(pair[0][1], torch.nn.Embedding) and isinstance(pair[1][1], torch.nn.Linear)):
            continue
        emb, head = pair[0][0], pair[1][0]
        members = [by_name[n] for n in (emb, head) if n in by_name]
        if not members:
            continue
        left = [n for n in (emb, head) if n in kept]
        if left:
            other = head if left[0] == emb else emb
            raise MoveError(f"quantize: {left[0]} is overridden to 16 bits but shares its weight with {other} "
                            "(tie_word_embeddings), which the step quantizes; quantize both or neither")
        if len({(p.method, p.bits, p.group_size) for p in members}) > 1:
            got = "; ".join(f"{p.name}: {_label(p)}" for p in members)
            raise MoveError(f"quantize: {emb} and {head} share one weight (tie_word_embeddings) but get different "
                            f"settings ({got}); give both the same method, bits and group_size")
        p = members[0]
        if p.method in TIED_METHODS:
            pairs.append(TiedPair(emb, head, p.method, p.bits, int(p.group_size)))
    return pairs


def _untie(model: torch.nn.Module, planned: list[Planned]) -> list[str]:
    """Gives each planned module that shares its weight its own copy; returns notes."""
    owners = {k: [n for n, _ in v] for k, v in _sharers(model).items()}
    notes, names = [], {p.name for p in planned}
    for p in planned:
        sharers = [n for n in owners.get(id(p.module.weight), []) if n != p.name]
        if not sharers:
            continue
        if not isinstance(p.module, torch.nn.Embedding):
            p.module.weight = torch.nn.Parameter(p.module.weight.detach().clone(), requires_grad=False)
        dense = [n for n in sharers if n not in names]
        notes.append(f"untied {p.name} from {', '.join(sharers)} (tie_word_embeddings=False)"
                     + (f"; {', '.join(dense)} keeps the dense weight, so the model grows ({p.method} codes "
                        f"cannot serve both; {' or '.join(TIED_METHODS)} keep them tied)" if dense else ""))
        for cfg in {id(c): c for c in (model.config, _text_config(model)) if c is not None}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    return notes


def _text_config(model):
    get = getattr(model.config, "get_text_config", None)
    return get() if callable(get) else None


def _label(p: Planned) -> str:
    gs = "" if p.method in ("bnb_int8",) or p.group_size is None else f" g{p.group_size}"
    return f"{p.method} {p.bits}-bit{gs}"


def apply(model: torch.nn.Module, step: QuantizeStep, ctx) -> StepReport:
    """Quantizes the planned modules in place and reports bytes, bits and kernels.

    Args:
        model: a transformers causal LM (modified in place).
        step: the quantize step.
        ctx: the apply context (calibration data for gptq).

    Returns:
        StepReport: modules quantized, bytes before/after, fast_kernel, notes (bits mix, tied or untied).

    Raises:
        MoveError: the step cannot apply as configured (same checks as :func:`check`).
    """
    check(model, step, ctx)
    planned, kept = plan(model, step)
    before = snapshot(model)
    pairs = _tied_pairs(model, planned, kept)
    tied = {n for t in pairs for n in (t.embedding, t.head)}
    notes = _untie(model, [p for p in planned if p.name not in tied])
    for t in pairs:
        notes.extend(quantize_pair(model, t.embedding, t.head, t.method, t.bits, t.group_size))
    for method in _ORDER:
        items = [p for p in planned if p.method == method and p.name not in tied]
        if items:
            log.info("quantize: %d modules with %s", len(items), method)
            backend = importlib.import_module(BACKENDS[method][0])
            notes.extend(backend.quantize_all(model, items, step, ctx))
    notes = list(dict.fromkeys(notes))
    if kept:
        notes.append(f"{len(kept)} targeted modules left at 16 bits by override")
    flags = [getattr(model.get_submodule(p.name), "greenopt_fast_kernel", None) for p in planned]
    flags = [f for f in flags if f is not None]
    mix = Counter(_label(p) for p in planned)
    summary = f"quantized {len(planned)} modules: " + ", ".join(f"{n}x {k}" for k, n in mix.most_common())
    return step_report("quantize", summary, model, before, modules=len(planned),
                       fast_kernel=all(flags) if flags else None, notes=tuple(notes))
