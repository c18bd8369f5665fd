"""GPTQ checkpoints: greenopt's packed rtn/gptq codes written in the standard GPTQ format.

ONNX Runtime GenAI's model builder reads a GPTQ checkpoint (``config.json`` with a
``quantization_config`` of ``quant_method: gptq``) and turns its codes into MatMulNBits without
re-quantizing. :func:`write_gptq` writes the codes, scales and zeros a variant's
:class:`~greenopt.compress.q_packed.PackedLinear` modules hold, as measured in torch, in that
layout (AutoGPTQ's ``checkpoint_format: gptq``, which the builder's reader assumes):

- ``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the input features, feature
  ``i`` in word ``i // (32 / bits)`` at bit ``(i % (32 / bits)) * bits``;
- ``qzeros`` int32 ``[groups, out * bits / 32]``: zero points minus one, modulo ``2 ** bits``
  (the reader adds the one back), packed the same way along the output features;
- ``scales`` float16 ``[groups, out]`` and ``g_idx`` int32 ``[in]`` (``i // group_size``:
  greenopt's act-order keeps groups of consecutive features, so ``desc_act`` is false).

Every decoder Linear must hold such codes, at one bit width and group size; lm_head and the
embedding stay float. What the format cannot hold is refused with one line naming the module.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from greenopt.compress.q_packed import SCALE_DTYPE, PackedEmbedding, PackedLinear, unpack
from greenopt.compress.targeting import decoder_layers, in_target
from greenopt.config import Deploy, QuantizeStep
from greenopt.config.variant import BLOCK_SIZES
from greenopt.errors import ConfigError, MoveError

__all__ = ["GPTQ_BITS", "IMPORTED", "GptqExport", "gptq_tensors", "has_packed", "pack_int32", "step_refusal",
           "unpack_int32", "write_gptq"]

#: Code widths the builder imports, and the ``Deploy.weights`` each needs.
GPTQ_BITS = {4: "int4", 8: "int8"}
#: What the build record says about weights that came from a greenopt quantize step.
IMPORTED = "imported GPTQ codes (not re-quantized)"
_METHODS = ("gptq", "rtn")  # affine integer codes per group of consecutive inputs: the GPTQ format
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_REFUSED = "onnxruntime-genai cannot realise a quantize step"
_PACKED = (PackedLinear, PackedEmbedding)


@dataclass(frozen=True)
class GptqExport:
    """What :func:`write_gptq` wrote: the code width, group size and how many Linears."""

    bits: int
    group_size: int
    modules: int


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Packs non-negative codes ``< 2 ** bits`` into int32 words along ``dim`` (2-D), low bits first.

    Raises:
        ValueError: ``dim``'s length is not a whole number of words.
    """
    per = 32 // bits
    x = values.to(torch.int64).movedim(dim, -1)
    if x.shape[-1] % per:
        raise ValueError(f"{x.shape[-1]} values do not fill {bits}-bit int32 words ({per} a word)")
    x = x.reshape(*x.shape[:-1], -1, per) << (torch.arange(per, dtype=torch.int64) * bits)
    words = x.sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as int32 bit patterns
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int64 codes."""
    x = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    codes = (x.unsqueeze(-1) >> (torch.arange(32 // bits, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*x.shape[:-1], -1).movedim(-1, dim)


def gptq_tensors(module: PackedLinear) -> dict[str, torch.Tensor]:
    """A PackedLinear's codes as GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``; ``bias`` if any).

    Raises:
        ValueError: its zeros are not integer codes (an hqq-style float zero).
    """
    bits, gs = module.bits, module.group_size
    q = unpack(module.codes.cpu(), bits, module.cols)  # [out, in]
    scale = module.scale.cpu().view(SCALE_DTYPE)  # [out, groups]
    zero = module.zero.cpu().view(SCALE_DTYPE).float()
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() >= 1 << bits:
        raise ValueError(f"its zero points are not {bits}-bit integers")
    zero_minus_one = (zero.to(torch.int64) - 1) & ((1 << bits) - 1)
    out = {"qweight": pack_int32(q.t(), bits, dim=0), "qzeros": pack_int32(zero_minus_one.t(), bits, dim=1),
           "scales": scale.t().contiguous(),
           "g_idx": (torch.arange(module.cols, dtype=torch.int32) // gs).to(torch.int32)}
    if module.bias is not None:
        out["bias"] = module.bias.detach().cpu().float()
    return out


def _survives_reader(module: PackedLinear) -> bool:
    """Whether the builder's reader gets these codes back: it dequantizes them in float16 and rounds
    ``(w + zero * scale) / scale`` again, which a subnormal float16 scale can move by a code."""
    q = unpack(module.codes.cpu(), module.bits, module.cols).to(torch.int32)
    scale = module.scale.cpu().view(SCALE_DTYPE).repeat_interleave(module.group_size, 1)
    zero = module.zero.cpu().view(SCALE_DTYPE).float().to(torch.int32).repeat_interleave(module.group_size, 1)
    scale_zero = zero * scale  # float16, as the reader computes them
    w = q * scale - scale_zero
    return torch.equal(torch.round((w + scale_zero) / scale).to(torch.int32), q)


def has_packed(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds greenopt's packed integer codes (a rtn, gptq or hqq quantize step)."""
    return any(isinstance(m, _PACKED) for m in model.modules())


def step_refusal(step: QuantizeStep, deploy: Deploy) -> str | None:
    """Why onnxruntime-genai cannot import the codes ``step`` makes for ``deploy``, one line, or None.

    A step it imports: method gptq or rtn, 4 bits (``weights: int4``) or 8 bits (``weights: int8``),
    one ``group_size`` that is a MatMulNBits block size and equals ``deploy.block_size``, over every
    decoder Linear (no layer range, no override that changes them) and not lm_head or the embedding.
    """
    methods = {step.method} | {o.method for o in step.overrides if o.method is not None}
    bits = {step.bits} | {o.bits for o in step.overrides if o.bits is not None}
    groups = {step.group_size} | {o.group_size for o in step.overrides if o.group_size is not None}
    if methods - set(_METHODS):
        return (f"{_REFUSED} with method {'/'.join(sorted(methods - set(_METHODS)))} (it imports gptq and rtn codes "
                "as a GPTQ checkpoint); use method gptq or rtn, its own weights: int4/int8, or runtime: transformers")
    if len(bits) > 1 or len(groups) > 1:
        return (f"{_REFUSED} whose overrides change bits or group_size (its GPTQ reader takes one width and group "
                "size for every decoder Linear, all of them quantized); drop the overrides, or runtime: transformers")
    (b,), (g,) = bits, groups
    if b not in GPTQ_BITS:
        return (f"{_REFUSED} with {b}-bit codes (it imports 4-bit codes as weights: int4 and 8-bit as int8); "
                "set bits: 4, or runtime: transformers")
    if deploy.weights != GPTQ_BITS[b]:
        return (f"{_REFUSED} with {b}-bit codes on weights: {deploy.weights} (it imports them as MatMulNBits "
                f"{GPTQ_BITS[b]}); set weights: {GPTQ_BITS[b]}")
    if g not in BLOCK_SIZES:
        return (f"{_REFUSED} with group_size {g} (MatMulNBits blocks are {', '.join(map(str, BLOCK_SIZES))} "
                "input features); set group_size to one of them")
    if deploy.block_size != g:
        return (f"{_REFUSED} with group_size {g} on block_size {deploy.block_size} (the imported codes keep their "
                f"groups as MatMulNBits blocks); set block_size: {g}")
    return _target_refusal(step)


def _target_refusal(step: QuantizeStep) -> str | None:
    t = step.target
    if in_target("lm_head", t) or in_target("model.embed_tokens", t):
        return (f"{_REFUSED} that quantizes lm_head or the embedding (greenopt imports decoder Linears; the head "
                "and embedding stay float there); leave them out of the target, or runtime: transformers")
    if t.layers is not None or not all(in_target(f"model.layers.0.{n}", t) for n in _LINEARS):
        return (f"{_REFUSED} over part of the decoder (its GPTQ reader needs every decoder Linear quantized); "
                "target every layer's Linears (include: ['*'], no layers), or runtime: transformers")
    return None


def write_gptq(model: torch.nn.Module, tokenizer, out: Path) -> GptqExport:
    """Writes ``model``'s packed decoder Linears and float tensors as a GPTQ checkpoint folder.

    The codes, scales and zeros are the ones the torch model computes with; nothing is
    re-quantized. Other tensors are written as float32 (a tied head once, as the embedding).

    Args:
        model: a llama-like causal LM whose every decoder Linear is a 4- or 8-bit rtn/gptq
            :class:`~greenopt.compress.q_packed.PackedLinear` of one group size; left as found.
        tokenizer: its tokenizer, saved beside it.
        out: the folder to write (``model.safetensors``, ``config.json``, tokenizer files).

    Returns:
        The code width, group size and number of Linears written.

    Raises:
        ConfigError: a module the format cannot hold (named, with why and what to change).
    """
    packed = _packed_linears(model)
    bits, gs = _one_format(packed)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in packed.items():
        try:
            layout = gptq_tensors(mod)
        except ValueError as e:
            raise ConfigError(f"{name}: cannot be written as GPTQ codes ({e}); use method gptq or rtn") from None
        if not _survives_reader(mod):
            raise ConfigError(f"{name}: onnxruntime-genai's GPTQ reader would round some of its codes differently "
                              "(float16 scales too small); deploy it with runtime: transformers")
        tensors.update({f"{name}.{k}": v for k, v in layout.items()})
    tensors.update(_float_tensors(model, packed))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # as save_pretrained records it; the builder dispatches on it
    config.quantization_config = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": False,
                                  "sym": False, "static_groups": False, "checkpoint_format": "gptq"}
    config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "greenopt_gptq.json").write_text(json.dumps({"bits": bits, "group_size": gs, "modules": len(packed)}),
                                            encoding="utf-8")
    return GptqExport(bits, gs, len(packed))


def _packed_linears(model: torch.nn.Module) -> dict[str, PackedLinear]:
    """Every decoder Linear by name; refuses a float one, a packed head or embedding, or another method."""
    try:
        layers = decoder_layers(model)
    except MoveError as e:
        raise ConfigError(f"GPTQ export: {e}") from None
    prefix = next(n for n, m in model.named_modules() if m is layers)
    packed: dict[str, PackedLinear] = {}
    for name, mod in model.named_modules():
        inside = name.startswith(prefix + ".")
        if isinstance(mod, _PACKED) and not (inside and isinstance(mod, PackedLinear)):
            raise ConfigError(f"{name}: quantized lm_head/embedding codes are not imported into onnxruntime-genai "
                              "(greenopt writes GPTQ codes for decoder Linears; the head and embedding stay float); "
                              "leave them out of the quantize step, or runtime: transformers")
        if isinstance(mod, PackedLinear):
            if mod.method not in _METHODS:
                raise ConfigError(f"{name}: {mod.method} codes are not in the GPTQ format (integer zero points); "
                                  "quantize with method gptq or rtn, or runtime: transformers")
            packed[name] = mod
        elif inside and isinstance(mod, torch.nn.Linear):
            raise ConfigError(f"{name}: is float, and onnxruntime-genai's GPTQ reader needs every decoder Linear "
                              "quantized; quantize every layer's Linears, or runtime: transformers")
        elif inside and not list(mod.children()) and any(p.dim() >= 2 for p in mod.parameters(recurse=False)):
            raise ConfigError(f"{name}: a {type(mod).__name__} has no GPTQ form; deploy it with runtime: transformers")
    return packed


def _one_format(packed: dict[str, PackedLinear]) -> tuple[int, int]:
    """The one (bits, group size) all modules share; refuses mixes and what MatMulNBits cannot take."""
    first = next(iter(packed))
    bits, gs = packed[first].bits, packed[first].group_size
    for name, mod in packed.items():
        if (mod.bits, mod.group_size) != (bits, gs):
            raise ConfigError(f"{name}: {mod.bits}-bit codes in groups of {mod.group_size}, but {first} has "
                              f"{bits}-bit in groups of {gs}; the GPTQ import takes one width and group size")
        if mod.bits not in GPTQ_BITS:
            raise ConfigError(f"{name}: {mod.bits}-bit codes; onnxruntime-genai imports 4-bit (int4) or 8-bit (int8) "
                              "GPTQ codes: quantize with bits 4 or 8, or runtime: transformers")
        if mod.group_size not in BLOCK_SIZES:
            raise ConfigError(f"{name}: group size {mod.group_size} is not a MatMulNBits block size "
                              f"({', '.join(map(str, BLOCK_SIZES))}); quantize with one of them")
        per = 32 // mod.bits
        if mod.out_features % per or mod.in_features % per:
            raise ConfigError(f"{name}: {mod.in_features}x{mod.out_features} does not fill {mod.bits}-bit int32 "
                              f"words ({per} a word); deploy it with runtime: transformers")
    return bits, gs


def _float_tensors(model: torch.nn.Module, packed: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    """The state dict minus the packed modules, float32 on CPU; a tied head is left to the embedding."""
    owned = tuple(f"{n}." for n in packed)
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if name.startswith(owned):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # a tied head: the reader takes the embedding for it
            continue
        seen[key] = name
        t = t.detach().cpu()
        out[name] = (t.float() if t.is_floating_point() else t).contiguous().clone()
    return out
