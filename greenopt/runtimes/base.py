"""The interface every runtime offers: generate the workload, score tokens, describe and export itself."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch

from greenopt.records import RuntimeDescription


class Runtime(abc.ABC):
    """A model realised on one runtime, as it is deployed.

    Measurement (:mod:`greenopt.measure.workload`) meters windows around :meth:`generate`;
    evaluation (:mod:`greenopt.evaluate`) and the KL look score :meth:`logits`; both run on this
    same artifact, never on a stand-in. Implementations: :class:`~greenopt.runtimes.hf.TransformersRuntime`,
    :class:`~greenopt.runtimes.ortgenai.OrtGenAIRuntime`.

    Attributes:
        name: the runtime's name as a :class:`~greenopt.config.Deploy` spells it.
        module: the torch module holding the weights (None when the runtime owns them outside torch);
            meters check its placement, HF-specific evaluation uses it.
        device: ``cpu`` or ``cuda:N``, where the runtime computes.
        max_length: the longest sequence (tokens) it scores, its context window (None: unknown).
    """

    name: ClassVar[str]
    module: torch.nn.Module | None = None
    device: str = "cpu"
    max_length: int | None = None

    @abc.abstractmethod
    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy generation with the KV cache, exactly ``new_tokens`` per row (EOS ignored).

        Args:
            input_ids: ``[batch, prompt_tokens]`` int64 prompts, no padding.
            new_tokens: tokens to generate per row.

        Returns:
            ``[batch, new_tokens]`` int64, the generated tokens only.
        """

    @abc.abstractmethod
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position of unpadded rows: ``[batch, tokens, vocab]`` float32 on CPU."""

    @abc.abstractmethod
    def describe(self) -> RuntimeDescription:
        """Name, version, dtype, device, threads and the kernels its weights go through."""

    def weight_bytes(self) -> int | None:
        """Bytes its weights take as deployed (None: unknown)."""
        return None

    @abc.abstractmethod
    def export(self, out: Path) -> tuple[str, ...]:
        """Writes the runtime's artifact into the existing, empty folder ``out``; returns the files written."""

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """The state generate and logits run in (eval mode, no autograd); restores what it changed."""
        module = self.module
        was_training = bool(module is not None and module.training)
        if module is not None:
            module.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                module.train()
