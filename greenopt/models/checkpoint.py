"""Saving and rebuilding compressed modules: which loader an export needs, and greenopt's loader.

``plan_weights(model)`` inspects the modules the moves left in a model and decides:

- ``transformers``: only dense modules (pruned, depth/width-cut, expert-pruned, 2:4 masks), or
  bitsandbytes modules of one kind, which transformers' ``BitsAndBytesConfig`` describes;
- ``greenopt``: anything else. The state dict goes to ``greenopt-model.safetensors`` and
  ``greenopt_modules.json`` maps each compressed module to its kind and constructor meta.
  ``load_greenopt`` builds the base architecture from ``config.json`` (re-creating per-layer
  widths and MoEfied FFNs from ``config.greenopt_width`` / ``config.greenopt_moefy``), swaps
  in each compressed module built from its meta and tensors, then loads the rest strictly.

A module placed at two paths (a tied embedding and head sharing one packed tensor,
``packed_tied``) is stored once, under the path ``named_modules`` gives it first; the manifest's
``shared_modules`` maps each other path to that one and the loader places the same module there.

Kinds: ``packed_linear``/``packed_embedding``/``packed_tied`` (greenopt rtn/hqq/gptq), ``bnb_4bit``,
``bnb_int8`` (bitsandbytes), ``tensor_subclass`` (a Linear whose weight is a wrapper tensor
subclass such as torchao's ``Int8Tensor``, stored flattened).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from greenopt.compress.moe_module import rebuild_moefied
from greenopt.compress.q_bnb import _classes, canonical_4bit, quantize_module
from greenopt.compress.q_packed import PackedEmbedding, PackedLinear
from greenopt.compress.q_tied import PackedTied
from greenopt.compress.targeting import set_module
from greenopt.compress.width import rebuild_width
from greenopt.errors import ConfigError
from greenopt.models.files import MODULES, WEIGHTS, check_folder

_GREENOPT_STRUCTURAL = {"MoefiedMLP", "ExpertWeight"}


@dataclass
class WeightsPlan:
    """How an export stores its weights and which loader reads them back."""

    loader: str
    reason: str
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantization_config: Any = None
    notes: tuple[str, ...] = ()
    shared: dict[str, str] = field(default_factory=dict)  # other path -> the path a shared module is stored under


# ---------------------------------------------------------------------------- classify


def _bnb():
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


# ---------------------------------------------------------------------------- the registry


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


def _classify(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
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


def _shared_paths(model: torch.nn.Module, modules: dict[str, Any]) -> dict[str, str]:
    first = {id(m): n for n, m in model.named_modules() if n in modules}
    return {n: first[id(m)] for n, m in model.named_modules(remove_duplicate=False)
            if id(m) in first and n != first[id(m)]}


def _describe_packed_embedding(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    if not isinstance(m, PackedEmbedding):
        return None
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "bits": m.bits,
            "group_size": m.group_size, "method": m.method, "padding_idx": m.padding_idx,
            "dtype": _dtype_name(m.dtype_probe.dtype)}


def _describe_bnb_4bit(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    bnb = _bnb()
    if bnb is None or not isinstance(m, bnb.nn.Linear4bit):
        return None
    canon = canonical_4bit(m.weight)  # what write_weights stores (see _canonical_bnb_layout)
    qs = m.weight.quant_state if canon is None else canon[1]
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "quant_type": qs.quant_type, "blocksize": qs.blocksize, "nested": bool(qs.nested),
            "compute_dtype": _dtype_name(m.compute_dtype or torch.float32)}


def _describe_bnb_int8(name: str, m: torch.nn.Module) -> dict[str, Any] | None:
    bnb = _bnb()
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


def plan_weights(model: torch.nn.Module) -> WeightsPlan:
    """Decides the loader for ``model`` and collects compressed modules' meta. Writes nothing.

    Raises:
        ConfigError: a module greenopt cannot serialize.
    """
    modules = {n: spec for n, m in model.named_modules() if n and (spec := _classify(n, m)) is not None}
    shared = _shared_paths(model, modules)
    cfg = model.config
    reasons = []
    if getattr(cfg, "greenopt_width", None):
        reasons.append("per-layer widths (config.greenopt_width) fit no transformers config")
    if getattr(cfg, "greenopt_moefy", None):
        reasons.append("MoEfied FFNs (a router picking unweighted channel slices) match no transformers MoE "
                       "architecture; transformers would silently load the dense FFN instead")
    kinds = {s["kind"] for s in modules.values()}
    if any(k.startswith("packed_") for k in kinds):
        methods = sorted({s["meta"]["method"] for s in modules.values() if s["kind"].startswith("packed")})
        reasons.append(f"greenopt's packed {'/'.join(methods)} weights have no transformers quantizer")
    if "tensor_subclass" in kinds:
        reasons.append("torchao tensor-subclass weights quantized in place need transformers' own quantizer "
                       "to be saved by it")
    semi = [n for n, m in model.named_modules() if type(m).__name__ == "SemiSparseLinear"]
    notes = (f"{len(semi)} 2:4-sparse Linear modules are stored dense with their zeros (the sparse "
             "kernel is rebuilt by the 2:4 move on CUDA, not at load)",) if semi else ()
    bnb_kinds = {json.dumps({k: v for k, v in s["meta"].items() if k not in ("in_features", "out_features", "bias",
                                                                              "blocksize")}, sort_keys=True)
                 for s in modules.values() if s["kind"].startswith("bnb_")}
    if len(bnb_kinds) > 1:
        reasons.append("bitsandbytes modules of different kinds cannot share one BitsAndBytesConfig")
    if reasons:
        return WeightsPlan(loader="greenopt", reason="; ".join(reasons), modules=modules, notes=notes, shared=shared)
    qc = _bnb_config(model, modules) if modules else None
    why = ("bitsandbytes weights with transformers' quantization_config" if qc is not None
           else "an ordinary (possibly smaller) transformers model")
    return WeightsPlan(loader="transformers", reason=why, modules=modules, quantization_config=qc, notes=notes)


def _bnb_config(model: torch.nn.Module, modules: dict[str, dict[str, Any]]) -> Any:
    from transformers import BitsAndBytesConfig

    meta = next(iter(modules.values()))
    skip = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    if meta["kind"] == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=meta["meta"]["threshold"],
                                  llm_int8_skip_modules=skip)
    m = meta["meta"]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=m["quant_type"],
                              bnb_4bit_compute_dtype=getattr(torch, m["compute_dtype"]),
                              bnb_4bit_use_double_quant=m["nested"], llm_int8_skip_modules=skip)


# ---------------------------------------------------------------------------- write


def _plain(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)


@contextlib.contextmanager
def _canonical_bnb_layout(model: torch.nn.Module):
    """Within the block, every CPU-repacked ``Linear4bit`` holds its canonical layout; restored after.

    bitsandbytes repacks 4-bit weights for its fused AVX-512-BF16 kernel at the first eval forward,
    and its ``state_dict`` inverse is incomplete (``q_bnb.canonical_4bit``). Both loaders save
    through ``state_dict``, so both see the canonical tensors here; the measured model itself is
    put back exactly as it was (same tensors, same QuantState objects).
    """
    bnb = _bnb()
    swapped = []
    if bnb is not None:

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit) and (canon := canonical_4bit(m.weight)) is not None:
                swapped.append((m, m.weight.data, m.weight.quant_state, m.__dict__.get("quant_state")))
                m.weight.data, m.weight.quant_state = canon
                m.quant_state = canon[1]
    try:
        yield
    finally:
        for m, data, qs, mod_qs in swapped:
            m.weight.data, m.weight.quant_state = data, qs
            m.quant_state = mod_qs


def write_weights(model: torch.nn.Module, plan: WeightsPlan, folder: Path) -> None:
    """Writes config, generation config and weights (safetensors) as the plan says.

    bitsandbytes 4-bit weights are written in their canonical layout even after a CPU forward
    repacked them (``_canonical_bnb_layout``).
    """
    with _canonical_bnb_layout(model):
        _write_weights(model, plan, folder)


def _write_weights(model: torch.nn.Module, plan: WeightsPlan, folder: Path) -> None:
    if plan.loader == "transformers":
        missing = object()
        old = getattr(model.config, "quantization_config", missing)
        if plan.quantization_config is not None:
            model.config.quantization_config = plan.quantization_config
        try:
            model.save_pretrained(folder)
        finally:
            if plan.quantization_config is not None:
                if old is missing:
                    del model.config.quantization_config
                else:
                    model.config.quantization_config = old
        return
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        owner = _owner(key, plan.modules)
        if owner is not None and plan.modules[owner]["kind"] == "tensor_subclass" and key == owner + ".weight":
            for inner in plan.modules[owner]["meta"]["inner"]:
                tensors[f"{key}.{inner}"] = _plain(getattr(t, inner))
        else:
            tensors[key] = _plain(t)
    aliases = _dedupe(tensors)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})
    manifest = {"format_version": 1, "reason": plan.reason, "modules": plan.modules, "aliases": aliases}
    if plan.shared:
        manifest["shared_modules"] = plan.shared
    (folder / MODULES).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _owner(key: str, modules: dict[str, Any]) -> str | None:
    name = key.rpartition(".")[0]
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Drops keys whose tensor shares storage with an earlier key (tied weights); returns alias -> kept."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases = {}
    for k in list(tensors):
        t = tensors[k]
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            aliases[k] = seen[ident]
            del tensors[k]
        else:
            seen[ident] = k
    return aliases


# ---------------------------------------------------------------------------- load


def load_greenopt(folder: Path, *, device: str = "cpu", dtype: str | None = None) -> torch.nn.Module:
    """Rebuilds a ``greenopt``-loader export: architecture, structural rebuilds, modules, weights.

    Raises:
        ConfigError: the manifest or weights do not match the rebuilt model.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig


    spec = json.loads((folder / MODULES).read_text())
    cfg = AutoConfig.from_pretrained(folder)
    want = getattr(torch, dtype) if dtype else _config_dtype(cfg)
    model = AutoModelForCausalLM.from_config(cfg, dtype=want)
    rebuild_width(model, getattr(cfg, "greenopt_width", None))
    rebuild_moefied(model, getattr(cfg, "greenopt_moefy", None))
    sd = load_file(str(folder / WEIGHTS))
    for alias, kept in spec.get("aliases", {}).items():
        sd[alias] = sd[kept]
    for name, mod_spec in spec["modules"].items():
        sub = {k[len(name) + 1:]: sd.pop(k) for k in [k for k in sd if k.startswith(name + ".")]}
        kind = KINDS.get(mod_spec.get("kind"))
        if kind is None:
            raise ConfigError(f"{folder / MODULES}: {name} has kind {mod_spec.get('kind')!r}, which this greenopt "
                              f"does not load (known: {', '.join(KINDS)})")
        set_module(model, name, kind.build(mod_spec["meta"], sub, name))
    placed = _place_shared(model, spec, sd, folder)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if _owner(k, placed) is None]
    if missing or unexpected:
        raise ConfigError(f"{folder}: weights do not match the rebuilt model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); was it written by another greenopt version?")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(device).eval()


def _place_shared(model: torch.nn.Module, spec: dict, sd: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    """Puts each shared module at its other paths (their tensors are aliases); returns every placed path."""
    placed = dict(spec["modules"])
    for path, stored in spec.get("shared_modules", {}).items():
        if stored not in spec["modules"]:
            raise ConfigError(f"{folder / MODULES}: shared module {path} points at {stored!r}, which the manifest "
                              "does not list; was it written by another greenopt version?")
        for k in [k for k in sd if k.startswith(path + ".")]:
            del sd[k]
        set_module(model, path, model.get_submodule(stored))
        placed[path] = spec["modules"][stored]
    return placed


def _config_dtype(cfg: Any) -> torch.dtype:
    dt = getattr(cfg, "dtype", None) or torch.float32
    return getattr(torch, dt) if isinstance(dt, str) else dt


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


def load(folder: str | Path, *, device: str = "cpu", dtype: str | None = None) -> torch.nn.Module:
    """Loads an exported checkpoint, whichever loader it needs, in eval mode.

    Args:
        folder: the export folder (or any transformers checkpoint folder).
        device: ``cpu`` or ``cuda[:N]``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the dense parts (default: as saved).

    Returns:
        The model; its tokenizer loads with ``AutoTokenizer.from_pretrained(folder)``.

    Raises:
        ConfigError: the folder holds no loadable checkpoint.
    """
    folder = Path(folder)
    check_folder(folder)
    if (folder / MODULES).is_file():
        return load_greenopt(folder, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": device} if device != "cpu" else {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise ConfigError(f"{folder}: no loadable checkpoint ({str(e).splitlines()[0]})") from None
    return model.to(device).eval() if device == "cpu" else model.eval()
