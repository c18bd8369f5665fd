"""Which accuracy tasks to run, and the calibration sample."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from greenopt.config._base import Strict


class EvalSpec(Strict):
    """Which accuracy tasks to run and how many items each (``limit=None``: full sets).

    ``include_path``: a folder of the user's own lm-eval task YAMLs (``--include-path``), whose
    data must be local; its tasks can then be named in ``tasks`` (docs/EVALUATION.md). It is
    part of which item set was scored.
    """

    version: Literal[1] = 1
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    limit: int | None = Field(100, ge=1)
    seed: int = 1234
    batch_size: int = Field(8, ge=1)
    num_fewshot: int = Field(0, ge=0)
    include_path: str | None = Field(None, min_length=1)


class CalibSpec(Strict):
    """Calibration sample shared by every move that needs one (never evaluation items)."""

    samples: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8)
    seed: int = 0


class KLSpec(Strict):
    """The KL fidelity look: fixed windows of held-aside text, scored against the baseline's top-k.

    ``windows`` windows of ``tokens`` tokens each are read from the Wikipedia ``perplexity``
    split (disjoint from calibration text, workload prompts and evaluation items), drawn with
    ``seed`` (None: spread evenly). The baseline keeps its ``top_k`` most likely next tokens at
    every position plus the mass of the rest (:mod:`greenopt.evaluate.fidelity`).
    """

    version: Literal[1] = 1
    windows: int = Field(32, ge=1, le=4096)
    tokens: int = Field(128, ge=2, le=8192)
    top_k: int = Field(64, ge=1, le=65536)
    seed: int | None = Field(0, ge=0)
