"""Label schemes as inputs: versioned, ordered classes over one metric (shared/ENERGY.md §5)."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, field_validator

from greenopt.config._base import Strict

Metric = Literal["eei", "joules_per_token"]


Metric = Literal["eei", "joules_per_token"]


class LabelClass(Strict):
    """One class: values ``<= max`` that no better class took; ``max=None`` is open-ended."""

    letter: str = Field(pattern=r"^[A-Z][A-Za-z0-9+]{0,3}$")
    max: float | None

    @field_validator("max")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("bound must be a finite number (use null for the open last class)")
        return v


class LabelScheme(Strict):
    """A versioned label scheme: ordered classes from best to worst over one metric.

    Classes are listed best first with strictly increasing ``max`` bounds; exactly one class,
    the last, is open-ended (``max: null``).
    """

    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    metric: Metric
    protocol: str = Field(min_length=1)
    description: str = ""
    classes: tuple[LabelClass, ...] = Field(min_length=2)

    @field_validator("classes")
    @classmethod
    def _ordered(cls, classes: tuple[LabelClass, ...]) -> tuple[LabelClass, ...]:
        letters = [c.letter for c in classes]
        dup = sorted({x for x in letters if letters.count(x) > 1})
        if dup:
            raise ValueError(f"duplicate class letter {dup[0]!r}")
        open_idx = [i for i, c in enumerate(classes) if c.max is None]
        if open_idx != [len(classes) - 1]:
            raise ValueError("exactly one class, the last, must be open-ended (max: null)")
        bounds = [c.max for c in classes[:-1]]
        for (a, b), c in zip(zip(bounds, bounds[1:]), classes[1:]):
            if not b > a:  # type: ignore[operator]
                raise ValueError(f"class {c.letter} bound {b} must exceed the previous bound {a}")
        return classes

    @property
    def letters(self) -> tuple[str, ...]:
        """Class letters, best first."""
        return tuple(c.letter for c in self.classes)

    @property
    def relative(self) -> bool:
        """True for schemes over EEI (relative to a baseline)."""
        return self.metric == "eei"

    def letter_for(self, value: float) -> str:
        """The class of ``value``; a value exactly on a bound gets the better class."""
        for c in self.classes:
            if c.max is None or value <= c.max:
                return c.letter
        raise AssertionError("unreachable: the last class is open-ended")

    def accepts_protocol(self, protocol_id: str) -> bool:
        """Whether a figure measured under ``protocol_id`` (e.g. ``GO-1/b1``) fits this scheme."""
        if self.metric == "joules_per_token":  # absolute bands hold for the anchored workload (any batch) only
            rest = protocol_id[len(self.protocol):] if protocol_id.startswith(self.protocol) else None
            return rest is not None and re.fullmatch(r"(/b\d+)?", rest) is not None
        return protocol_id == self.protocol or protocol_id.startswith(self.protocol + "/")
