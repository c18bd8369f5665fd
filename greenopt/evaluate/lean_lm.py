"""Scoring that scales with the vocabulary: logits only at the positions a request needs.

lm-eval's ``HFLM`` projects every position of every request onto the whole vocabulary and
log-softmaxes it all, then keeps a continuation's few positions; on a model with a 200k
vocabulary the output head is most of the work. :func:`lean_lm` runs the decoder body once per
batch and applies the head only at the continuation positions, log-softmaxed there in float32,
in chunks of at most :data:`CHUNK_FLOATS` values. Requests are built as ``HFLM`` builds them
(tokenization, left truncation to the context window keeping the continuation, batches of
similar length, one forward for requests that differ only in a one-token continuation), so the
scores equal ``HFLM``'s to float rounding on a float32 model (``HFLM`` log-softmaxes a bf16
model in bf16, this in float32).

How the head is applied is probed once per wrapper, on a short fixed input, against the model's
own full forward; the first path that reproduces it is used:

- ``head``: the base model's last hidden state at the needed positions through
  ``get_output_embeddings()`` (and the config's ``final_logit_softcapping``), position chunk by
  chunk: the one path whose memory stays bounded however many positions a request scores;
- ``keep``: the model's own forward with ``logits_to_keep`` (a ``[batch, positions]`` index), for
  a head that does more than that (a logit scale, say);
- ``full``: the full logits, cut to the positions (what ``HFLM`` pays).

:func:`logprob_chunks` gives the next-token log-probabilities at every position of a runtime's
rows in bounded chunks (the KL look, perplexity windows). The request handling is shared with
:mod:`greenopt.evaluate.runtime_lm`, which scores through :meth:`Runtime.logits` instead.

Example:
    >>> import torch
    >>> from greenopt.evaluate.lean_lm import lean_lm, token_logprobs
    >>> from greenopt.runtimes import as_runtime
    >>> from greenopt.testing import tiny_llama, tiny_tokenizer
    >>> model, tok = tiny_llama(), tiny_tokenizer()
    >>> lm = lean_lm(model, tok, batch_size=4)  # pass it to lm_eval.evaluator.evaluate(lm=...)
    >>> token_logprobs(as_runtime(model, tok), torch.tensor([[5, 6, 7, 8]])).shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from greenopt.errors import ConfigError
from greenopt.runtimes import Runtime, TransformersRuntime

__all__ = ["CHUNK_FLOATS", "lean_lm", "lm_choice", "logprob_chunks", "token_logprobs"]

log = logging.getLogger(__name__)

CHUNK_FLOATS = 1 << 25  # vocabulary-wide values per log-softmax chunk (128 MiB of float32)
DEFAULT_MAX_LENGTH = 2048  # HFLM's, when neither the config nor the tokenizer gives one
_BODY_TOKENS = 4096  # tokens per body forward in logprob_chunks
_PROBE = (16, (3, 9, 15))  # probe length and the positions compared
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # else 3e-2 (half types)


def lean_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int, max_length: int | None = None) -> Any:
    """An lm-eval ``LM`` over a transformers causal LM that computes logits only where requests need them.

    Args:
        model: a ``transformers`` causal LM, possibly compressed (packed low-bit modules, bf16).
            Scored in eval mode and inference mode; its train/eval mode is restored after each call.
        tokenizer: its tokenizer (not modified).
        batch_size: requests per forward (at most; fewer where their logits would not fit
            :data:`CHUNK_FLOATS` and the head cannot be applied in chunks).
        max_length: the context window (default: as ``HFLM`` resolves it from the config and tokenizer).

    Returns:
        An ``lm_eval.api.model.TemplateLM``: ``loglikelihood``, ``loglikelihood_rolling`` and greedy
        ``generate_until`` (through :meth:`TransformersRuntime.generate`).
    """
    if max_length is None:
        from lm_eval.models.utils import resolve_max_length  # lazy: lm_eval

        max_length = resolve_max_length(getattr(model, "config", None), tokenizer, default=DEFAULT_MAX_LENGTH)
    return lm_class(_LeanLM)(model, tokenizer, batch_size, max_length)


def lm_choice() -> str:
    """How :func:`greenopt.evaluate.evaluate` scores a transformers model: ``GREENOPT_EVAL_LM``.

    ``lean`` (the default): :func:`lean_lm`; ``hflm``: lm-eval's own ``HFLM``, for comparison.

    Raises:
        ConfigError: any other value.
    """
    choice = os.environ.get("GREENOPT_EVAL_LM", "lean")
    if choice not in ("lean", "hflm"):
        raise ConfigError(f"GREENOPT_EVAL_LM={choice!r}: use 'lean' (the default) or 'hflm' (lm-eval's HFLM)")
    return choice


def logprob_chunks(runtime: Runtime, input_ids: torch.Tensor, max_floats: int | None = None,
                   ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Next-token log-probabilities at every position of unpadded rows, chunk by chunk.

    On the transformers runtime (its own ``logits`` method) the body runs once per group of
    rows and the head per chunk (see the module docstring), so a chunk holds at most
    ``max_floats`` values. Any other runtime (or an overridden ``logits``) is asked for whole
    rows, as many as fit ``max_floats`` (at least one), and its rows are cut into chunks.

    Args:
        runtime: where to score.
        input_ids: ``[rows, tokens]`` int64.
        max_floats: the most vocabulary-wide values one chunk holds (default :data:`CHUNK_FLOATS`).

    Yields:
        ``(positions, logp)``: a slice of the row-major flattened ``rows * tokens`` positions and
        their ``[len, vocab]`` float32 log-probabilities on CPU (a fresh tensor the caller may modify).
    """
    n_rows, n_tok = input_ids.shape
    max_floats = max_floats or CHUNK_FLOATS
    start = 0
    with runtime.measuring():
        if _own_transformers_logits(runtime):
            head = _Logits(runtime.module)
            step = max(1, _BODY_TOKENS // n_tok)
            for r in range(0, n_rows, step):
                ids = input_ids[r:r + step].to(runtime.device)
                for logits in head.chunks(ids, [(0, n_tok)] * ids.shape[0], max_floats):
                    for lp in log_softmax_parts(logits, max_floats):
                        yield slice(start, start + lp.shape[0]), lp.cpu()
                        start += lp.shape[0]
            return
        r, step = 0, 1  # the first row tells the vocabulary, and so how many rows fit
        while r < n_rows:
            logits = runtime.logits(input_ids[r:r + step])
            vocab = logits.shape[-1]
            for lp in log_softmax_parts(logits.reshape(-1, vocab), max_floats):
                yield slice(start, start + lp.shape[0]), lp
                start += lp.shape[0]
            r += step
            step = max(1, max_floats // (n_tok * vocab))


def token_logprobs(runtime: Runtime, input_ids: torch.Tensor) -> torch.Tensor:
    """``log p(input_ids[:, t + 1] | input_ids[:, :t + 1])`` for every row: ``[rows, tokens - 1]`` float32.

    Memory is bounded as in :func:`logprob_chunks`; ``-mean`` of it is the mean NLL of the rows.
    """
    n_rows, n_tok = input_ids.shape
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1).reshape(-1)  # the last column is unused
    out = torch.empty(n_rows * n_tok, dtype=torch.float32)
    for span, lp in logprob_chunks(runtime, input_ids):
        out[span] = lp.gather(-1, targets[span, None]).squeeze(-1)
    return out.view(n_rows, n_tok)[:, :-1]


def log_softmax_parts(logits: torch.Tensor, max_floats: int | None = None) -> Iterator[torch.Tensor]:
    """``[m, vocab]`` logits (any float dtype) as float32 log-softmax parts of at most ``max_floats``
    values (default :data:`CHUNK_FLOATS`)."""
    step = max(1, (max_floats or CHUNK_FLOATS) // max(1, logits.shape[-1]))
    for s in range(0, logits.shape[0], step):
        yield logits[s:s + step].float().log_softmax(-1)


@functools.cache
def lm_class(scoring: type) -> type:
    """``scoring`` (a :class:`TokenLM` subclass) mixed into lm-eval's ``TemplateLM``, built once on first use."""
    from lm_eval.api.model import TemplateLM  # lazy: lm_eval

    name = scoring.__name__.lstrip("_")
    return types.new_class(name, (scoring, TemplateLM), exec_body=lambda ns: ns.update(
        __module__=scoring.__module__, __qualname__=name, __doc__=scoring.__doc__))


# ---------------------------------------------------------------------------- requests


@dataclass
class Row:
    """One model input and the requests scored on it: ``HFLM``'s ``(context + continuation)[-(L+1):][:-1]``,
    shared by requests whose ``context + continuation[:-1]`` is the same (one forward for them)."""

    ids: list[int]
    members: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation)

    @property
    def kept(self) -> int:
        """Positions scored: the last ``kept`` of ``ids``, the longest member's continuation."""
        return max(len(c) for _, c in self.members)


def build_rows(requests: Iterable[tuple[Any, list[int], list[int]]], max_length: int) -> list[Row]:
    """Rows for lm-eval's ``(key, context tokens, continuation tokens)`` requests, longest first.

    Raises:
        ConfigError: a continuation longer than the context window (``HFLM`` asserts the same).
    """
    rows: dict[tuple[int, ...], Row] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: empty context or continuation (lm-eval gives neither)")
        if len(cont) > max_length:
            raise ConfigError(f"a continuation of {len(cont)} tokens exceeds the model's context of {max_length} "
                              "tokens; score a shorter continuation or a model with a longer context")
        key = (*ctx, *cont[:-1])
        if key not in rows:
            rows[key] = Row(list(key[-max_length:]))
        rows[key].members.append((i, list(cont)))
    return sorted(rows.values(), key=lambda r: (-len(r.ids), r.ids))


def score_rows(rows: list[Row], chunks: Iterable[torch.Tensor]) -> list[tuple[int, float, bool]]:
    """``(request index, sum log p(continuation), continuation is greedy)`` for every member of ``rows``.

    ``chunks`` are logits ``[m, vocab]`` (any dtype, any device) over the rows' kept positions,
    row after row, each row's in order; the log-softmax is taken per chunk, in float32.
    """
    pos: list[int] = []
    tgt: list[int] = []
    mid: list[int] = []
    index: list[int] = []
    off = 0
    for row in rows:
        for i, cont in row.members:
            first = off + row.kept - len(cont)
            pos += range(first, first + len(cont))
            tgt += cont
            mid += [len(index)] * len(cont)
            index.append(i)
        off += row.kept
    pos_t, tgt_t, mid_t = (torch.tensor(x, dtype=torch.long) for x in (pos, tgt, mid))
    sums = torch.zeros(len(index), dtype=torch.float64)
    misses = torch.zeros(len(index), dtype=torch.long)
    s = 0
    for logits in chunks:
        for lp in log_softmax_parts(logits):
            e = s + lp.shape[0]
            sel = (pos_t >= s) & (pos_t < e)
            at, t = (pos_t[sel] - s).to(lp.device), tgt_t[sel].to(lp.device)
            sums.index_add_(0, mid_t[sel], lp[at, t].double().cpu())
            misses.index_add_(0, mid_t[sel], (lp.argmax(-1)[at] != t).long().cpu())
            s = e
    if s != off:
        raise RuntimeError(f"scored {s} positions where the rows keep {off}")
    return [(i, v, k == 0) for i, v, k in zip(index, sums.tolist(), misses.tolist(), strict=True)]


class TokenLM:
    """What greenopt's lm-eval models share: ``HFLM``'s tokenization and requests, rolling windows,
    greedy generation. A subclass says how rows are batched (:meth:`_batches`), how their logits
    come (:meth:`_logit_chunks`), in what state (:meth:`_scoring`), and how it generates."""

    backend = "causal"

    def __init__(self, tokenizer: Any, batch_size: int, max_length: int) -> None:
        super().__init__()
        self.tokenizer, self.batch_size, self.max_length = tokenizer, max(1, int(batch_size)), int(max_length)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id])):
            kw["add_special_tokens"] = False  # the text already starts with BOS
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        rows = build_rows(requests, self.max_length)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with self._scoring():
            for batch in self._batches(rows):
                for i, logp, greedy in score_rows(batch, self._logit_chunks(batch)):
                    out[i] = (logp, greedy)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils  # lazy: lm_eval

        windows, owner = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            for w in utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                     max_seq_len=self.max_length, context_len=1):
                windows.append((None, *utils.make_disjoint_window(w)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[k] += logp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            if gen_kwargs.get("do_sample"):
                raise ConfigError(f"task {req.task_name!r} asks to sample (do_sample: true); greenopt generates "
                                  "greedily: set do_sample: false in its generation_kwargs")
            until = gen_kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            n = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(1, self.max_length - n):]
            with self._scoring():
                new = self._generate(torch.tensor([ids], dtype=torch.long), n)[0].tolist()
            if self.eot_token_id in new:  # generation runs past EOS; HFLM stops there
                new = new[:new.index(self.eot_token_id)]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out

    # the subclass's part

    def _scoring(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def _batches(self, rows: list[Row]) -> Iterator[list[Row]]:
        raise NotImplementedError

    def _logit_chunks(self, rows: list[Row]) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def _generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        raise NotImplementedError


class _LeanLM(TokenLM):
    """lm-eval's model interface over a transformers causal LM, computing logits only where requests need them."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int, max_length: int) -> None:
        super().__init__(tokenizer, batch_size, max_length)
        self.model = model
        self._runtime = TransformersRuntime(model, tokenizer)

    @functools.cached_property
    def _logits(self) -> _Logits:
        return _Logits(self.model)

    def _scoring(self) -> contextlib.AbstractContextManager:
        return self._runtime.measuring()

    def _batches(self, rows: list[Row]) -> Iterator[list[Row]]:
        for s in range(0, len(rows), self.batch_size):
            yield rows[s:s + self.batch_size]

    def _logit_chunks(self, rows: list[Row]) -> Iterator[torch.Tensor]:
        ids = torch.zeros(len(rows), max(len(r.ids) for r in rows), dtype=torch.long)  # right-padded, as HFLM
        for k, r in enumerate(rows):
            ids[k, :len(r.ids)] = torch.tensor(r.ids)
        spans = [(len(r.ids) - r.kept, len(r.ids)) for r in rows]
        yield from self._logits.chunks(ids.to(self._runtime.device), spans)

    def _generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self._runtime.generate(input_ids, new_tokens)


# ---------------------------------------------------------------------------- the head


class _Logits:
    """A model's logits at chosen positions, by the cheapest path that reproduces its own forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.mode, self.vocab = _probe(model)
        log.debug("scoring %s through the %s path", type(model).__name__, self.mode)

    def chunks(self, ids: torch.Tensor, spans: list[tuple[int, int]], max_floats: int | None = None,
               ) -> Iterator[torch.Tensor]:
        """Logits ``[m, vocab]`` at positions ``a..b-1`` of each row of right-padded ``ids``, row after row."""
        max_floats = max_floats or CHUNK_FLOATS
        if self.mode == "head":
            h = _hidden(self.model, ids)
            flat = torch.cat([h[k, a:b] for k, (a, b) in enumerate(spans)])
            del h
            step = max(1, max_floats // self.vocab)
            for s in range(0, flat.shape[0], step):
                yield _apply_head(self.model, flat[s:s + step])
            return
        width = max(b - a for a, b in spans) if self.mode == "keep" else ids.shape[1]
        step = max(1, max_floats // (width * self.vocab))  # rows whose logits fit at once
        for r in range(0, ids.shape[0], step):
            part = spans[r:r + step]
            if self.mode == "keep":
                keep = torch.tensor([[*range(a, b), *[b - 1] * (width - b + a)] for a, b in part], device=ids.device)
                out = self.model(input_ids=ids[r:r + step], logits_to_keep=keep, use_cache=False).logits
                yield from (out[k, :b - a] for k, (a, b) in enumerate(part))
            else:
                out = self.model(input_ids=ids[r:r + step], use_cache=False).logits
                yield from (out[k, a:b] for k, (a, b) in enumerate(part))


def _probe(model: torch.nn.Module) -> tuple[str, int]:
    """(path, vocabulary): the first of ``head`` and ``keep`` whose logits match the full forward's, else ``full``."""
    n, positions = _PROBE
    emb = model.get_input_embeddings()
    ids_vocab = int(getattr(emb, "num_embeddings", 0) or model.config.vocab_size)
    device = next(model.parameters()).device
    ids = torch.randint(0, ids_vocab, (1, n), generator=torch.Generator().manual_seed(0)).to(device)
    keep = torch.tensor([positions], device=device)
    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False).logits[0, list(positions)]
        tol = _TOLERANCE.get(want.dtype, 3e-2) * max(1.0, float(want.float().nan_to_num().abs().max()))
        tries = {"head": lambda: _apply_head(model, _hidden(model, ids)[0, list(positions)]),
                 "keep": lambda: model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits[0]}
        for mode, fn in tries.items():
            try:
                got = fn()
            except (TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
                log.debug("the %s path does not run on %s: %s", mode, type(model).__name__, e)
                continue
            if got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=0, atol=tol, equal_nan=True):
                return mode, int(want.shape[-1])
            log.debug("the %s path does not reproduce %s's logits", mode, type(model).__name__)
    return "full", int(want.shape[-1])


def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    body = model.base_model
    if body is model:
        raise AttributeError("no base model apart from the head")
    out = body(input_ids=ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _apply_head(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _own_transformers_logits(runtime: Runtime) -> bool:
    """True for a transformers runtime whose ``logits`` is the class's own (not overridden or patched)."""
    method = getattr(runtime, "logits", None)
    return (isinstance(runtime, TransformersRuntime) and runtime.module is not None
            and getattr(method, "__func__", None) is TransformersRuntime.logits)
