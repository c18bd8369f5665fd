"""The reference runtime: a transformers causal LM in torch, greenopt's steps applied in place."""

from __future__ import annotations

import collections
import time
from importlib.metadata import version
from pathlib import Path

import torch

from greenopt.compress import accounting
from greenopt.records import RuntimeDescription
from greenopt.runtimes.base import Runtime


_LENGTH_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's HFLM reads these


class TransformersRuntime(Runtime):
    """A Hugging Face causal LM run by ``transformers`` (eager/SDPA attention, KV cache, greedy).

    Compiled mode (``compiled=True``) generates with a static KV cache and the decode step
    compiled by ``torch.compile`` (inductor, static shapes; on CPU too). Compiling happens on the
    first generation of each shape (the protocol's warm-up, which is never measured); the
    seconds it took are kept apart (``compile_s``) and shown by :meth:`describe`. Scoring
    (:meth:`logits`) runs the same module eagerly: the same weights, the same arithmetic
    up to the fusion's rounding.

    Args:
        model: the (possibly compressed) ``PreTrainedModel``; used as is, never copied.
        tokenizer: its tokenizer (pad and EOS ids for generate).
        compiled: static cache + torch.compile for generate.
    """

    name = "transformers"

    def __init__(self, model: torch.nn.Module, tokenizer, *, compiled: bool = False) -> None:
        from transformers import GenerationConfig

        self.module, self.tokenizer, self.compiled = model, tokenizer, compiled
        self.compile_s: dict[tuple[int, ...], float] = {}
        self.device = str(_device(model))
        config = getattr(model, "config", None)
        self.max_length = next((int(v) for v in (getattr(config, a, None) for a in _LENGTH_ATTRS) if v), None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._common = dict(do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad,
                            eos_token_id=tokenizer.eos_token_id)
        if compiled:
            self._common.update(cache_implementation="static", compile_config=_compile_config())
        self._configs: dict[int, GenerationConfig] = {}
        self._config_type = GenerationConfig

    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        config = self._configs.get(new_tokens)
        if config is None:
            config = self._configs[new_tokens] = self._config_type(
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, **self._common)
        ids = input_ids.to(self.device)
        shape = (*ids.shape, new_tokens)
        t = time.perf_counter()
        out = self.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        if self.compiled and shape not in self.compile_s:  # the first call of a shape compiles it
            self.compile_s[shape] = time.perf_counter() - t
        return out[:, ids.shape[1]:]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device)
        return self.module(input_ids=ids, use_cache=False).logits.float().cpu()

    def describe(self) -> RuntimeDescription:
        config = getattr(self.module, "config", None)
        attention = getattr(config, "_attn_implementation", None) or "default"
        return RuntimeDescription(
            name=self.name, version=version("transformers"), dtype=str(_dtype(self.module)).removeprefix("torch."),
            device=self.device, threads=torch.get_num_threads() if self.device == "cpu" else None,
            kernels=weight_kernels(self.module), options={"attention": attention, **self._compile_options()},
            libraries={"torch": version("torch")})

    def weight_bytes(self) -> int | None:
        return accounting.weight_bytes(self.module)

    def _compile_options(self) -> dict[str, str]:
        if not self.compiled:
            return {}
        first = ", ".join(f"{'x'.join(map(str, k))} {v:.1f} s" for k, v in self.compile_s.items()) or "not yet"
        return {"compiled": f"torch.compile inductor {torch.__version__}, static KV cache",
                "compile_s": f"first call per shape (batch x prompt x new tokens), compile included: {first}"}

    def export(self, out: Path) -> tuple[str, ...]:
        """Writes a plain ``save_pretrained`` checkpoint; greenopt's own export (with low-bit modules
        and the manifest) lives in :mod:`greenopt.ship` and is what ``greenopt export`` writes."""
        self.module.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return tuple(sorted(p.name for p in out.iterdir()))


def weight_kernels(model: torch.nn.Module) -> tuple[str, ...]:
    """The compute paths a model's weights take, as ``ModuleType[weight type or dtype] xN``, most first.

    A torchao or bitsandbytes weight shows as its tensor subclass (``Linear[AffineQuantizedTensor] x210``),
    a dense one as its dtype (``Linear[bfloat16] x210``).
    """
    counts: collections.Counter[str] = collections.Counter()
    for module in model.modules():
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is None or w.ndim != 2 or isinstance(module, torch.nn.Embedding):
            continue  # norms and lookups are not matmul kernels
        kind = type(w.data).__name__ if type(w.data) is not torch.Tensor else str(w.dtype).removeprefix("torch.")
        counts[f"{type(module).__name__}[{kind}]"] += 1
    return tuple(f"{k} x{n}" for k, n in counts.most_common())


def _compile_config():
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")  # reduce-overhead is CUDA graphs
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


def _device(model: torch.nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def _dtype(model: torch.nn.Module) -> torch.dtype:
    dt = getattr(model, "dtype", None)
    return dt if isinstance(dt, torch.dtype) else next(model.parameters()).dtype

