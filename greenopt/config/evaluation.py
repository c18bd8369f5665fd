"""Which accuracy tasks to run, and the calibration sample."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from greenopt.config._base import Strict


class EvalSpec(Strict):
    """Which accuracy tasks to run and how many items each (``limit=None``: full sets)."""

    version: Literal[1] = 1
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    limit: int | None = Field(100, ge=1)
    seed: int = 1234
    batch_size: int = Field(8, ge=1)
    num_fewshot: int = Field(0, ge=0)


class CalibSpec(Strict):
    """Calibration sample shared by every move that needs one (never evaluation items)."""

    samples: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8)
    seed: int = 0
