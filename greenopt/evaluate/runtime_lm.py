"""lm-eval's model interface over a greenopt runtime, so accuracy is scored on the deployed artifact.

Tokenization follows lm-eval's ``HFLM`` for causal models (the tokenizer's own special-token
rule, BOS as the prefix token, continuations split off the whole encoding), so a model scored
here and through ``HFLM`` sees the same tokens; scores match to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from greenopt.runtimes import Runtime

_DEFAULT_MAX_LENGTH = 2048


def runtime_lm(runtime: Runtime, tokenizer: Any, batch_size: int, max_length: int | None = None) -> Any:
    """An lm-eval ``LM`` that scores with ``runtime.logits`` and generates with ``runtime.generate``."""
    from lm_eval.api.model import TemplateLM  # lazy: lm_eval

    class RuntimeLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.runtime, self.tokenizer, self.batch_size = runtime, tokenizer, batch_size
            self.max_length = max_length or runtime.max_length or _DEFAULT_MAX_LENGTH

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return _encode(self.tokenizer, string, add_special_tokens, self.prefix_token_id)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
            return _score(self.runtime, [(ctx, cont) for _, ctx, cont in requests], self.max_length,
                          self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils  # lazy: lm_eval

            out = []
            for (text,) in (r.args for r in requests):
                windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                out.append(sum(lp for lp, _ in _score(self.runtime, windows, self.max_length, self.batch_size)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, gen_kwargs in (r.args for r in requests):
                until = gen_kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                n = int(gen_kwargs.get("max_gen_toks", 256))
                ids = self.tok_encode(context)[-(self.max_length - n):]
                new = self.runtime.generate(torch.tensor([ids], dtype=torch.long), n)[0].tolist()
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                out.append(text[:cut])
            return out

    return RuntimeLM()


def _encode(tokenizer: Any, text: str, add_special_tokens: bool | None, prefix_id: int) -> list[int]:
    kwargs: dict[str, bool] = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None and text.startswith(tokenizer.decode([prefix_id])):
        kwargs["add_special_tokens"] = False  # the text already starts with BOS
    return tokenizer.encode(text, **kwargs)


def _score(runtime: Runtime, pairs: list[tuple[list[int], list[int]]], max_length: int,
           batch_size: int) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is greedy) per pair, rows of equal length batched."""
    rows: list[tuple[int, list[int], int]] = []
    for i, (ctx, cont) in enumerate(pairs):
        ids = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        rows.append((i, ids, len(cont)))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    by_len: dict[int, list[tuple[int, list[int], int]]] = {}
    for row in rows:
        by_len.setdefault(len(row[1]), []).append(row)
    with runtime.measuring():
        for group in by_len.values():
            for start in range(0, len(group), max(1, batch_size)):
                chunk = group[start:start + max(1, batch_size)]
                logp = torch.log_softmax(runtime.logits(torch.tensor([r[1] for r in chunk])), dim=-1)
                for (i, _, n_cont), lp in zip(chunk, logp, strict=True):
                    cont = torch.tensor(pairs[i][1][-n_cont:] if n_cont else [], dtype=torch.long)
                    tail = lp[-n_cont:] if n_cont else lp[:0]
                    picked = tail.gather(-1, cont[:, None]).squeeze(-1)
                    out[i] = (float(picked.sum()), bool((tail.argmax(-1) == cont).all()))
    return out  # type: ignore[return-value]
