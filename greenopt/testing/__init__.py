"""Test doubles shipped with greenopt: tiny seeded models, a tokenizer, fake meters.

Used by greenopt's own tests and available to users' tests:

    >>> from greenopt.testing import tiny_llama, tiny_tokenizer, FakeMeter
    >>> model, tok = tiny_llama(), tiny_tokenizer()
    >>> meter = FakeMeter(power_w=50.0)
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch

from greenopt.measure.base import Meter
from greenopt.records import DeviceInfo, Tier, WindowResult

_TEXT = (
    "The quick brown fox jumps over the lazy dog. Energy is measured in joules, power in "
    "watts. A language model predicts the next token from the previous ones. Compression "
    "removes bits, layers, channels or experts; only some of it saves energy. "
) * 4


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained in-process on fixed text; no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    return fast


def tiny_llama(seed: int = 0, layers: int = 4, hidden: int = 64, intermediate: int = 128,
               heads: int = 4, kv_heads: int = 2, vocab: int | None = None,
               tie_embeddings: bool = True):
    """A seeded llama-style causal LM (GQA, SwiGLU), small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab or len(tiny_tokenizer()), hidden_size=hidden,
        intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=tie_embeddings, pad_token_id=0, eos_token_id=0, bos_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    _widen_init(model)
    return model


def tiny_mixtral(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 64,
                 experts: int = 4, top_k: int = 2):
    """A seeded Mixtral-style MoE causal LM for expert-pruning tests."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=len(tiny_tokenizer()), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=0, bos_token_id=0,
    )
    model = MixtralForCausalLM(cfg).eval()
    _widen_init(model)
    return model


def _widen_init(model: torch.nn.Module) -> None:
    # HF's default init (std 0.02) makes tiny models near-constant; a wider init gives
    # outputs whose changes tests can see.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # fused MoE experts are 3-D [experts, out, in]
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)


class FakeMeter(Meter):
    """Energy = power_w x wall time (or a scripted function of duration). Tier configurable.

    Args:
        power_w: constant power in W.
        tier: the tier to report (default M1, to exercise plain letters).
        energy_fn: optional ``f(duration_s) -> energy_j`` replacing power_w x duration.
    """

    name = "fake"
    min_window_s = 0.0

    def __init__(self, power_w: float = 100.0, tier: Tier = "M1",
                 energy_fn: Callable[[float], float] | None = None) -> None:
        self.power_w = power_w
        self.tier = tier
        self.energy_fn = energy_fn
        self.windows = 0

    def device(self) -> DeviceInfo:
        return DeviceInfo(kind="cpu", name="fake device", meter="fake",
                          boundary="fake meter (tests only)")

    def _start(self) -> object:
        return time.perf_counter()

    def _stop(self, token: object, duration_s: float) -> WindowResult:
        self.windows += 1
        e = self.energy_fn(duration_s) if self.energy_fn else self.power_w * duration_s
        return WindowResult(energy_j=e, duration_s=duration_s, tier=self.tier)


class ReplayMeter(Meter):
    """Returns scripted window energies in order (for exact statistics tests)."""

    name = "replay"

    def __init__(self, energies_j: list[float], tier: Tier = "M1") -> None:
        self._energies = list(energies_j)
        self.tier = tier

    def device(self) -> DeviceInfo:
        return DeviceInfo(kind="cpu", name="replay device", meter="replay",
                          boundary="replayed figures (tests only)")

    def _start(self) -> object:
        return None

    def _stop(self, token: object, duration_s: float) -> WindowResult:
        if not self._energies:
            raise RuntimeError("ReplayMeter ran out of scripted energies")
        return WindowResult(energy_j=self._energies.pop(0), duration_s=duration_s, tier=self.tier)
