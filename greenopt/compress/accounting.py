"""What a model costs: parameter bytes, weight bits per layer, sparsity, FLOPs per token.

Replacement modules written by the moves may expose three optional hooks, honoured here:
``greenopt_bits`` (effective stored bits per weight, scales included),
``greenopt_flops_per_token()`` (multiply-add FLOPs the module really executes per token),
``greenopt_fast_kernel`` (True when a kernel faster than dense fp runs on this device).
Two more optional hooks for quantized storage: ``greenopt_params`` (logical parameters of the
module itself; its own packed parameters are then not counted) and ``greenopt_extra_bytes``
(bytes held outside parameters and buffers, e.g. bitsandbytes quantization state).
Tensor subclasses that wrap inner tensors (torchao) count by their inner tensors.
FLOPs count what the kernels execute: unstructured zeros in a dense matmul still cost FLOPs.
One module placed at two paths (a tied embedding and head sharing one packed tensor) counts
once in parameters, bytes and FLOPs; :func:`bits_per_layer` lists it under each path.
"""

from __future__ import annotations

import torch

from greenopt.compress.targeting import layer_index


def _key(t: torch.Tensor) -> int:
    # Wrapper subclasses (torchao) report data_ptr 0; tell them apart by identity.
    ptr = 0 if _inner_names(t) else t.data_ptr()
    return ptr or id(t)


def _inner_names(t: torch.Tensor) -> list[str]:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    return list(flatten(t)[0]) if callable(flatten) else []


def _stored_bytes(t: torch.Tensor) -> int:
    names = _inner_names(t)
    if names:
        return sum(_stored_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def param_count(model: torch.nn.Module) -> int:
    """Logical parameters (tied tensors once); packed quantized weights count by their hook."""
    seen, n = set(), 0
    for m in model.modules():
        logical = getattr(m, "greenopt_params", None)
        if logical is not None:
            n += int(logical)
            seen.update(_key(p) for p in m.parameters(recurse=False))
    for p in model.parameters():
        if _key(p) not in seen:
            seen.add(_key(p))
            n += p.numel()
    return n


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel() == 0 or _key(t) in seen:
            continue
        seen.add(_key(t))
        total += _stored_bytes(t)
    for m in model.modules():
        extra = getattr(m, "greenopt_extra_bytes", None)
        if extra is not None:
            total += int(extra() if callable(extra) else extra)
    return total


def _own_flops(m: torch.nn.Module) -> int | None:
    hook = getattr(m, "greenopt_flops_per_token", None)
    if callable(hook):
        return int(hook())
    if isinstance(m, torch.nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")):
        return 2 * int(m.in_features) * int(m.out_features)
    return None


def flops_per_token(model: torch.nn.Module) -> int:
    """Matmul FLOPs per generated token (2 x multiply-adds), attention scores excluded."""
    total, skip = 0, ()
    for name, m in model.named_modules():
        if skip and name.startswith(skip):
            continue
        f = _own_flops(m)
        if f is not None:
            total += f
            skip = tuple(s for s in (name + ".",) if name)
    return total


def bits_per_layer(model: torch.nn.Module) -> dict[str, float]:
    """Effective stored bits per weight of each Linear-like module (16/32 when dense)."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):  # a tied head keeps its own entry
        bits = getattr(m, "greenopt_bits", None)
        if bits is None and isinstance(m, torch.nn.Linear):
            bits = float(m.weight.element_size() * 8)
        if bits is not None:
            out[name] = float(bits)
    return out


def sparsity(model: torch.nn.Module) -> float:
    """Fraction of exact zeros over all dense Linear weights (0.0 when none)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.is_floating_point() and not _inner_names(m.weight):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total if total else 0.0


def fast_kernel(model: torch.nn.Module) -> bool | None:
    """True/False when any module says; None when no module uses a special kernel."""
    flags = [getattr(m, "greenopt_fast_kernel") for m in model.modules()
             if getattr(m, "greenopt_fast_kernel", None) is not None]
    return all(flags) if flags else None


def layers_of(names) -> dict[int, list[str]]:
    """Groups qualified names by decoder layer index."""
    out: dict[int, list[str]] = {}
    for n in names:
        i = layer_index(n)
        if i is not None:
            out.setdefault(i, []).append(n)
    return out
