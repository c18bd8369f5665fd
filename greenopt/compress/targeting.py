"""Select modules by name patterns (globs or ``re:`` regexes) and decoder layer ranges."""

from __future__ import annotations

import fnmatch
import re

import torch

from greenopt.config import Target, parse_layers
from greenopt.errors import MoveError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def layer_index(name: str) -> int | None:
    """Decoder layer index in a qualified module name (``model.layers.3.mlp`` -> 3)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def in_target(name: str, target: Target) -> bool:
    """Whether a qualified module name falls inside ``target``."""
    if not any(_matches(name, p) for p in target.include):
        return False
    # An explicit include of a name wins over the default exclusions (e.g. include lm_head).
    explicit = name in target.include
    if not explicit and any(_matches(name, p) for p in target.exclude):
        return False
    if target.layers is not None:
        idx = layer_index(name)
        if idx is None or idx not in parse_layers(target.layers):
            return False
    return True


def select(model: torch.nn.Module, target: Target, types: tuple[type, ...] = (torch.nn.Linear,),
           what: str = "step") -> list[tuple[str, torch.nn.Module]]:
    """Modules of ``types`` inside ``target``, in model order.

    Raises:
        MoveError: nothing matches (a pattern typo should never silently do nothing).
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, types) and in_target(n, target)]
    if not found:
        raise MoveError(f"{what}: target {target.model_dump(exclude_defaults=True) or 'default'} "
                        f"matches no {'/'.join(t.__name__ for t in types)} module; "
                        "check include/exclude patterns and layers")
    return found


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (``model.model.layers`` for llama-style models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise MoveError(f"{type(model).__name__}: no decoder layer list at model.layers; "
                        "structured moves support llama/mistral/qwen/mixtral-style models")
    return layers


def layer_set(model: torch.nn.Module, spec: str | None) -> tuple[int, ...]:
    """Decoder layer indices named by ``spec`` (all when None); raises MoveError if out of range."""
    n = len(decoder_layers(model))
    if spec is None:
        return tuple(range(n))
    idx = parse_layers(spec)
    bad = [i for i in idx if i >= n]
    if bad:
        raise MoveError(f"layers {spec!r}: model has {n} decoder layers (0-{n - 1}); {bad[0]} is out of range")
    return idx


def set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Replaces the submodule at qualified ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
