"""The calibration sample shared by every move that needs one, and activation statistics.

Text comes from the Wikipedia ``calibration`` split (disjoint from prompts, the quick look's
held-aside text and evaluation items).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from greenopt import offline
from greenopt.config import CalibSpec
from greenopt.errors import MoveError

_CACHE: dict[tuple, torch.Tensor] = {}  # (tokenizer, spec) -> windows; the newest _CACHE_MAX kept
_CACHE_MAX = 4


def calibration_batch(tokenizer, spec: CalibSpec) -> torch.LongTensor:
    """``[spec.samples, spec.seq_len]`` token ids: seeded windows over the calibration text.

    Each window starts at a paragraph of an article, after the tokenizer's BOS token where it
    defines one (:func:`text_windows`). Cached per (tokenizer, spec), so every move in a
    process sees the same sample.
    """
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), tuple(leading_bos(tokenizer)), spec)
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = text_windows(tokenizer, offline.wiki_split("calibration"), spec.samples, spec.seq_len,
                                   seed=spec.seed)
    return _CACHE[key]


def leading_bos(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer itself puts BOS before text it encodes, else ``[]``.

    The model's own regime decides, not whether a BOS token is defined: Llama-style tokenizers
    prepend BOS and their models run far out of distribution without it, while SmolLM2 defines
    ``<|im_start|>`` as BOS but never adds it to text (prepending it there raised the default
    model's held-aside perplexity from 29.1 to 30.9; ``scripts/bos_probe.py``).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos] else []


def text_windows(tokenizer, articles: tuple[str, ...], n: int, seq_len: int, *,
                 seed: int | None = None) -> torch.LongTensor:
    """``[n, seq_len]`` token ids, each window read from the start of a paragraph.

    A window never starts mid-sentence: it starts at a paragraph of one of ``articles`` and
    runs on through the following text. Where the tokenizer puts BOS before text
    (:func:`leading_bos`), BOS is the first token of every window. ``seed=None`` spreads the windows evenly over the paragraphs; a seed draws
    them at random, reproducibly.

    Raises:
        MoveError: the text is too short for one window.
    """
    bos = leading_bos(tokenizer)
    body = seq_len - len(bos)
    starts = [(a, p) for a, art in enumerate(articles) for p, para in enumerate(art.split("\n")) if para.strip()]
    if not starts or body < 1:
        raise MoveError("calibration text is shorter than one sample")
    if seed is None:
        step = len(starts) / n
        picks = [starts[int(i * step)] for i in range(n)]
    else:
        g = torch.Generator().manual_seed(seed)
        picks = [starts[i] for i in torch.randint(0, len(starts), (n,), generator=g).tolist()]
    rows = []
    for a, p in picks:
        ids: list[int] = []
        text = "\n".join(articles[a].split("\n")[p:])
        k = a
        while len(ids) < body:
            ids += tokenizer(text[: 16 * body], add_special_tokens=False).input_ids
            k += 1
            if len(ids) < body and k >= len(articles) + a:
                raise MoveError("calibration text is shorter than one sample")
            text = "\n\n" + articles[k % len(articles)]
        rows.append(bos + ids[:body])
    return torch.tensor(rows, dtype=torch.long)


@contextlib.contextmanager
def capture(modules: dict[str, torch.nn.Module], fn) -> Iterator[None]:
    """Calls ``fn(name, module, inputs, output)`` on every forward of the given modules."""
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: fn(n, mod, inp, out))
               for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _HeadReached(Exception):
    """Raised on entering the output head: the forwards here need only what comes before it."""


@torch.inference_mode()
def run_batches(model: torch.nn.Module, batch: torch.LongTensor, rows_per_step: int = 8) -> None:
    """Runs the calibration batch through the model for its hooks (outputs discarded).

    The forward stops on entering the output head (``get_output_embeddings()``), whose
    vocabulary-wide logits nothing here reads, unless a hook watches the head or the whole model.
    """
    device = next(model.parameters()).device
    with _stop_at_head(model):
        for i in range(0, batch.shape[0], rows_per_step):
            try:
                model(batch[i:i + rows_per_step].to(device), use_cache=False)
            except _HeadReached:
                pass


@contextlib.contextmanager
def _stop_at_head(model: torch.nn.Module) -> Iterator[None]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    # A hook on the head, a forward hook on the model (it runs after the head) or a global
    # module hook must still see the whole forward.
    watched = head is None or _hooked(head) or bool(model._forward_hooks) or bool(
        torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)
    if watched:
        yield
        return

    def stop(mod, args):
        if args and torch.is_tensor(args[0]) and args[0].is_floating_point():  # a tied packed head also takes ids
            raise _HeadReached

    handle = head.register_forward_pre_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def input_feature_norms(model: torch.nn.Module, modules: dict[str, torch.nn.Module],
                        batch: torch.LongTensor) -> dict[str, torch.Tensor]:
    """L2 norm over all calibration tokens of each input feature of each module (float32, cpu).

    This is Wanda's ``||X_j||`` and the activation score for channel pruning.
    """
    sq: dict[str, torch.Tensor] = {}

    def hook(name, mod, inp, out):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        s = (x * x).sum(0).cpu()
        sq[name] = sq[name] + s if name in sq else s

    with capture(modules, hook):
        run_batches(model, batch)
    return {n: v.sqrt() for n, v in sq.items()}
