"""The compressed module kinds an export can hold: how each is described and rebuilt.

A :class:`ModuleKind` pairs ``describe(name, module)`` (the constructor meta, JSON-ready, when
the module is of this kind, else None) with ``build(meta, tensors, name)`` (the module rebuilt
from that meta and its state-dict entries). :data:`KINDS` is the registry and the allowlist:
loading builds only registered kinds, and a ``tensor_subclass`` only of a class in
:data:`TENSOR_PACKAGES`. :mod:`greenopt.models.checkpoint` plans, writes and loads with them.

Kinds: ``packed_tied``/``packed_linear``/``packed_embedding`` (greenopt rtn/hqq/gptq),
``bnb_4bit``, ``bnb_int8`` (bitsandbytes), ``tensor_subclass`` (a Linear whose weight is a
wrapper tensor subclass such as torchao's ``Int8Tensor``, stored flattened).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from greenopt.compress.q_bnb import _classes, canonical_4bit, quantize_module
from greenopt.compress.q_packed import PackedEmbedding, PackedLinear
from greenopt.compress.q_tied import PackedTied
from greenopt.errors import ConfigError

__all__ = ["KINDS", "TENSOR_PACKAGES", "ModuleKind", "bnb_module", "classify", "register"]


_GREENOPT_STRUCTURAL = {"MoefiedMLP", "ExpertWeight"}


def bnb_module():
    """bitsandbytes if something already imported it, else None (a model holding its modules did)."""
    return sys.modules.get("bitsandbytes")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _jsonable(x: Any, where: str) -> Any:
    if isinstance(x, torch.dtype):
        return {"__dtype__": _dtype_name(x)}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, where) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v, where) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise ConfigError(f"export: {where} has tensor metadata {type(x).__name__} that greenopt cannot store")


def _unjson(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__dtype__"}:
            return getattr(torch, x["__dtype__"])
        return {k: _unjson(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjson(v) for v in x]
    return x


def _greenopt_attrs(m: torch.nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if k.startswith("greenopt_") and isinstance(v, (bool, int, float, str))}


@dataclass(frozen=True)
class ModuleKind:
    """How one compressed module type is saved and rebuilt.

    ``describe(name, module)`` returns the constructor meta (JSON-ready) when ``module`` is of
    this kind, else None; ``build(meta, tensors, name)`` rebuilds it from that meta and its
    state-dict entries. Loading builds only registered kinds: the registry is the allowlist.
    """

    name: str
    describe: Callable[[str, torch.nn.Module], dict[str, Any] | None]
    build: Callable[[dict, dict, str], torch.nn.Module]


KINDS: dict[str, ModuleKind] = {}


#: Packages whose tensor subclasses a ``tensor_subclass`` module may hold (torchao's int8
#: weights). A manifest naming a class elsewhere is refused: loading never imports an
#: arbitrary class a file names.
TENSOR_PACKAGES = ("torchao.",)


def register(kind: ModuleKind) -> ModuleKind:
    """Adds a module kind to the registry (order matters: the first kind that describes a module wins)."""
    KINDS[kind.name] = kind
    return kind


def classify(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    """The module's kind and constructor meta, None for a plain module; raises for unknown ones."""
    for kind in KINDS.values():
        meta = kind.describe(name, m)
        if meta is not None:
            return {"kind": kind.name, "meta": meta}
    cls = type(m).__name__
    if type(m).__module__.startswith("greenopt.") and cls not in _GREENOPT_STRUCTURAL and cls != "SemiSparseLinear":
        raise ConfigError(f"export: {name} is a {cls}, which greenopt does not know how to save; "
                          "report this, or export before that step")
    return None


def _describe_packed_linear(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    if not isinstance(m, PackedLinear):
        return None
    return {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "group_size": m.group_size, "method": m.method, "bias": m.bias is not None,
            "compute_dtype": str(m.compute_dtype).removeprefix("torch.")}


def _describe_packed_tied(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    if not isinstance(m, PackedTied):
        return None
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "bits": m.bits,
            "group_size": m.group_size, "method": m.method, "padding_idx": m.padding_idx, "bias": m.bias is not None,
            "dtype": _dtype_name(m.dtype_probe.dtype), "compute_dtype": _dtype_name(m.compute_dtype)}


def _describe_packed_embedding(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    if not isinstance(m, PackedEmbedding):
        return None
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "bits": m.bits,
            "group_size": m.group_size, "method": m.method, "padding_idx": m.padding_idx,
            "dtype": _dtype_name(m.dtype_probe.dtype)}


def _describe_bnb_4bit(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    bnb = bnb_module()
    if bnb is None or not isinstance(m, bnb.nn.Linear4bit):
        return None
    canon = canonical_4bit(m.weight)  # what write_weights stores (see _canonical_bnb_layout)
    qs = m.weight.quant_state if canon is None else canon[1]
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "quant_type": qs.quant_type, "blocksize": qs.blocksize, "nested": bool(qs.nested),
            "compute_dtype": _dtype_name(m.compute_dtype or torch.float32)}


def _describe_bnb_int8(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    bnb = bnb_module()
    if bnb is None or not isinstance(m, bnb.nn.Linear8bitLt):
        return None
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "threshold": float(m.state.threshold)}


def _tensor_class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _allowed_tensor_class(ref: str, where: str) -> None:
    if not ref.partition(":")[0].startswith(TENSOR_PACKAGES):
        raise ConfigError(f"{where}: weight tensor class {ref} is not one greenopt loads "
                          f"(allowed packages: {', '.join(p.rstrip('.') for p in TENSOR_PACKAGES)})")


def _describe_tensor_subclass(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    w = getattr(m, "weight", None)
    if not (isinstance(m, torch.nn.Linear) and w is not None and hasattr(type(w), "__tensor_flatten__")):
        return None
    ref = _tensor_class_name(type(w))
    _allowed_tensor_class(ref, f"export: {name}")
    names, ctx = type(w).__tensor_flatten__(w)
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "tensor_class": ref, "inner": list(names), "ctx": _jsonable(ctx, name), "shape": list(w.shape),
            "stride": list(w.stride()), "attrs": _greenopt_attrs(m)}


def _load_into(m: torch.nn.Module, sub: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
    try:
        m.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"export: cannot load {name}: {str(e).splitlines()[0]}") from None
    return m.eval()


def _build_packed_linear(meta: dict, sub: dict, name: str) -> torch.nn.Module:
    o, i, g = meta["out_features"], meta["in_features"], meta["group_size"]
    z = torch.zeros(o, i // g)
    m = PackedLinear(torch.zeros(o, i, dtype=torch.uint8), z, z, meta["bits"], g,
                     torch.zeros(o) if meta["bias"] else None, meta["method"],
                     compute_dtype=getattr(torch, meta.get("compute_dtype", "float32")))
    return _load_into(m, sub, name)


def _build_packed_tied(meta: dict, sub: dict, name: str) -> torch.nn.Module:
    n, d, g = meta["num_embeddings"], meta["embedding_dim"], meta["group_size"]
    z = torch.zeros(n, d // g)
    m = PackedTied(torch.zeros(n, d, dtype=torch.uint8), z, z, meta["bits"], g,
                   torch.zeros(n) if meta["bias"] else None, meta["method"], getattr(torch, meta["dtype"]),
                   meta["padding_idx"])
    m.compute_dtype = getattr(torch, meta["compute_dtype"])
    return _load_into(m, sub, name)


def _build_packed_embedding(meta: dict, sub: dict, name: str) -> torch.nn.Module:
    n, d, g = meta["num_embeddings"], meta["embedding_dim"], meta["group_size"]
    z = torch.zeros(n, d // g)
    m = PackedEmbedding(torch.zeros(n, d, dtype=torch.uint8), z, z, meta["bits"], g,
                        getattr(torch, meta["dtype"]), meta["padding_idx"], meta["method"])
    return _load_into(m, sub, name)


def _build_bnb_4bit(meta: dict, sub: dict, name: str) -> torch.nn.Module:
    import bitsandbytes as bnb


    four = _classes()[1]
    m = four(meta["in_features"], meta["out_features"], bias=meta["bias"],
             compute_dtype=getattr(torch, meta["compute_dtype"]), compress_statistics=meta["nested"],
             quant_type=meta["quant_type"])
    stats = {k[len("weight."):]: v for k, v in sub.items() if k.startswith("weight.")}
    m.weight = bnb.nn.Params4bit.from_prequantized(data=sub["weight"], quantized_stats=stats, requires_grad=False,
                                                   device="cpu", module=m)
    if meta["bias"]:
        m.bias = torch.nn.Parameter(sub["bias"], requires_grad=False)
    return m.eval()


def _build_bnb_int8(meta: dict, sub: dict, name: str) -> torch.nn.Module:
    dense = torch.nn.Linear(meta["in_features"], meta["out_features"], bias=meta["bias"])
    return _load_into(quantize_module(dense, "bnb_int8", None, meta["threshold"]), sub, name)


def _build_tensor_subclass(meta: dict, sub: dict, name: str) -> torch.nn.Module:
    _allowed_tensor_class(meta["tensor_class"], f"export: {name}")
    mod_name, _, qual = meta["tensor_class"].partition(":")
    cls = importlib.import_module(mod_name)
    for part in qual.split("."):
        cls = getattr(cls, part)
    inner = {k: sub[f"weight.{k}"] for k in meta["inner"]}
    weight = cls.__tensor_unflatten__(inner, _unjson(meta["ctx"]), torch.Size(meta["shape"]), tuple(meta["stride"]))
    m = torch.nn.Linear(meta["in_features"], meta["out_features"], bias=meta["bias"], device="meta")
    m.weight = torch.nn.Parameter(weight, requires_grad=False)
    m.bias = torch.nn.Parameter(sub["bias"], requires_grad=False) if meta["bias"] else None
    for k, v in meta.get("attrs", {}).items():
        if not (k.startswith("greenopt_") and isinstance(v, (bool, int, float, str))):
            raise ConfigError(f"export: {name}: attribute {k!r} is not a greenopt_ scalar; refusing to set it")
        setattr(m, k, v)
    return m.eval()


# packed_tied first: a PackedTied is also a PackedLinear, and the first kind that describes a module wins.
for _kind in (ModuleKind("packed_tied", _describe_packed_tied, _build_packed_tied),
              ModuleKind("packed_linear", _describe_packed_linear, _build_packed_linear),
              ModuleKind("packed_embedding", _describe_packed_embedding, _build_packed_embedding),
              ModuleKind("bnb_4bit", _describe_bnb_4bit, _build_bnb_4bit),
              ModuleKind("bnb_int8", _describe_bnb_int8, _build_bnb_int8),
              ModuleKind("tensor_subclass", _describe_tensor_subclass, _build_tensor_subclass)):
    register(_kind)
