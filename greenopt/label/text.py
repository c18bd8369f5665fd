"""Number and score formatting shared by the card's Markdown and SVG renderers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from greenopt.records import Grade, TaskLine


def num(x: float | None, unit: str = "") -> str:
    """About three significant digits, no exponent for everyday magnitudes."""
    if x is None:
        return "n/a"
    a = abs(x)
    s = f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 1 else f"{x:.3g}"
    return f"{s} {unit}".rstrip()


def interval(ci: tuple[float, float]) -> str:
    return f"{num(ci[0])}–{num(ci[1])}"


def _is_fraction(t: TaskLine) -> bool:
    return t.higher_is_better and 0.0 <= t.value <= 1.0 and 0.0 <= t.baseline <= 1.0


def score(t: TaskLine, v: float) -> str:
    return f"{v * 100:.1f}%" if _is_fraction(t) else num(v)


def drop(t: TaskLine) -> str:
    return f"{t.drop * 100:.1f} pt" if _is_fraction(t) else f"{t.drop:.3g}"


def delta(t: TaskLine) -> str:
    d = t.value - t.baseline
    s = f"{d * 100:+.1f} pt" if _is_fraction(t) else f"{d:+.3g}"
    return s.replace("-", "−")


def scheme_name(g: Grade) -> str:
    return f"{g.scheme} v{g.scheme_version}"
