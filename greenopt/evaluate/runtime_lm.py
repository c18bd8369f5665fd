"""lm-eval's model interface over a greenopt runtime, so accuracy is scored on the deployed artifact.

Requests are built as lm-eval's ``HFLM`` builds them for causal models (the tokenizer's own
special-token rule, BOS as the prefix token, continuations split off the whole encoding, left
truncation keeping the continuation), by the code shared with :mod:`greenopt.evaluate.lean_lm`,
so a model scored here and through ``HFLM`` sees the same tokens; scores match to float rounding.
Rows of equal length are batched (:meth:`Runtime.logits` takes unpadded rows).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch

from greenopt.evaluate.lean_lm import DEFAULT_MAX_LENGTH, Row, TokenLM, lm_class
from greenopt.runtimes import Runtime


def runtime_lm(runtime: Runtime, tokenizer: Any, batch_size: int, max_length: int | None = None) -> Any:
    """An lm-eval ``LM`` that scores with ``runtime.logits`` and generates with ``runtime.generate`` (greedy)."""
    return lm_class(_RuntimeLM)(runtime, tokenizer, batch_size, max_length or runtime.max_length or DEFAULT_MAX_LENGTH)


class _RuntimeLM(TokenLM):
    """lm-eval's model interface over a greenopt runtime."""

    def __init__(self, runtime: Runtime, tokenizer: Any, batch_size: int, max_length: int) -> None:
        super().__init__(tokenizer, batch_size, max_length)
        self.runtime = runtime

    def _scoring(self) -> contextlib.AbstractContextManager:
        return self.runtime.measuring()

    def _batches(self, rows: list[Row]) -> Iterator[list[Row]]:
        for _, same in itertools.groupby(rows, key=lambda r: len(r.ids)):  # rows come longest first
            same = list(same)
            for s in range(0, len(same), self.batch_size):
                yield same[s:s + self.batch_size]

    def _logit_chunks(self, rows: list[Row]) -> Iterator[torch.Tensor]:
        logits = self.runtime.logits(torch.tensor([r.ids for r in rows], dtype=torch.long))
        for r, lg in zip(rows, logits, strict=True):
            yield lg[-r.kept:]

    def _generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self.runtime.generate(input_ids, new_tokens)
