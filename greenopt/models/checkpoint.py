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

The kinds of compressed module and how each is described and rebuilt live in
:mod:`greenopt.models.module_kinds` (its registry is the loader's allowlist).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from greenopt.compress.moe_module import rebuild_moefied
from greenopt.compress.q_bnb import canonical_4bit
from greenopt.compress.targeting import set_module
from greenopt.compress.width import rebuild_width
from greenopt.errors import ConfigError
from greenopt.models.files import MODULES, WEIGHTS, check_folder
from greenopt.models.module_kinds import KINDS, bnb_module, classify


@dataclass
class WeightsPlan:
    """How an export stores its weights and which loader reads them back."""

    loader: str
    reason: str
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantization_config: Any = None
    notes: tuple[str, ...] = ()
    shared: dict[str, str] = field(default_factory=dict)  # other path -> the path a shared module is stored under


def _shared_paths(model: torch.nn.Module, modules: dict[str, Any]) -> dict[str, str]:
    first = {id(m): n for n, m in model.named_modules() if n in modules}
    return {n: first[id(m)] for n, m in model.named_modules(remove_duplicate=False)
            if id(m) in first and n != first[id(m)]}


def plan_weights(model: torch.nn.Module) -> WeightsPlan:
    """Decides the loader for ``model`` and collects compressed modules' meta. Writes nothing.

    Raises:
        ConfigError: a module greenopt cannot serialize.
    """
    modules = {n: spec for n, m in model.named_modules() if n and (spec := classify(n, m)) is not None}
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
    bnb = bnb_module()
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
