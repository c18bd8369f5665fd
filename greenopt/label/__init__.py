"""Label schemes, grading and carbon (shared/ENERGY.md §3-5).

A scheme is a versioned file of ordered class bounds over one metric: ``eei`` (relative,
100 x candidate / baseline J/token) or ``joules_per_token`` (absolute, GO-1). Lower is better
for both. A value exactly on a bound belongs to the better class (``<=``).

Example:
    >>> from greenopt.label import load_scheme, grade, carbon_g_per_1k_tokens
    >>> eu = load_scheme("relative-eu")
    >>> grade(48.0, (46.0, 52.5), eu, "M1").display
    'B (B-C)'
    >>> grade(48.0, (46.0, 50.0), eu, "E1").display
    '~B (estimated)'
    >>> round(carbon_g_per_1k_tokens(1.0), 3)
    0.132

Display rules: an M1 figure carries a plain letter; M2 is marked ``(M2)``; an E1 estimate is
never a plain letter (``~B (estimated)``). When the 95% interval crosses a class bound the
letters of both interval ends are printed, and ``worst_letter`` (the worse end) is the one a
search should count.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

from greenopt.config import LabelClass, LabelScheme, load_yaml, validated
from greenopt.errors import ConfigError
from greenopt.records import Comparison, EnergyMeasurement, Goal, Grade, Tier

#: IEA world-average grid intensity in gCO2e/kWh; also CodeCarbon's fallback.
DEFAULT_GRID_G_PER_KWH = 475.0
_J_PER_KWH = 3.6e6

#: The EU energy label palette (the regulation's CMYK template in sRGB), dark green A -> red G,
#: and the ink that reads on each colour. The card and the Pareto plot both draw with it.
EU_PALETTE = ("#00a651", "#4db848", "#b3d335", "#fff200", "#fdb913", "#f37021", "#ed1c24")
EU_INK = ("#fff", "#fff", "#1a1a1a", "#1a1a1a", "#1a1a1a", "#fff", "#fff")

def schemes_dir() -> Path:
    """The shipped scheme folder (package data ``greenopt/label/schemes/``)."""
    return Path(str(resources.files("greenopt.label").joinpath("schemes")))


def load_scheme(name_or_path: str | Path | LabelScheme) -> LabelScheme:
    """Loads a label scheme by shipped name (``relative-eu``) or from a YAML file path.

    Args:
        name_or_path: a bare name found in ``greenopt/label/schemes/<name>.yaml``, a file path, or
            an already loaded scheme (returned as is).

    Returns:
        The validated scheme.

    Raises:
        ConfigError: no such scheme, not YAML, or a field is invalid (named by its path).
    """
    if isinstance(name_or_path, LabelScheme):
        return name_or_path
    text = str(name_or_path)
    shipped = schemes_dir() / f"{text}.yaml"
    is_bare = "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml"))
    if is_bare and shipped.is_file():
        path = shipped
    elif Path(text).is_file():
        path = Path(text)
    else:
        known = ", ".join(sorted(p.stem for p in schemes_dir().glob("*.yaml"))) or "none"
        raise ConfigError(f"label scheme {text!r} not found; use a file path or one of: {known}")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a label scheme must be a YAML mapping (name, version, metric, classes)")
    return validated(LabelScheme, data, where=f"label scheme {path}")


# ---------------------------------------------------------------------------- grading


def grade(value: float, interval: tuple[float, float], scheme: LabelScheme, tier: Tier) -> Grade:
    """Grades one figure on a scheme.

    The letter range spans the interval ends; if the point value lies outside its own
    interval (possible for a bootstrap with few trials) the range is widened to include it,
    never narrowed.

    Args:
        value: the point figure in the scheme's metric (EEI, or J/token).
        interval: the 95% interval ``(lo, hi)`` in the same unit.
        scheme: the label scheme.
        tier: the measurement tier of the figure (``M1``, ``M2``, ``E1``).

    Returns:
        The grade with its display text, e.g. ``"C (B-C)"``, ``"B (M2)"``, ``"~B (estimated)"``.

    Raises:
        ValueError: a value or bound is not a finite non-negative number, or ``lo > hi``.
    """
    lo, hi = float(interval[0]), float(interval[1])
    for v in (value, lo, hi):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"cannot grade {v!r}: figures must be finite and >= 0")
    if lo > hi:
        raise ValueError(f"interval ({lo}, {hi}) runs backwards")
    letter = scheme.letter_for(value)
    best, worst = scheme.letter_for(min(lo, value)), scheme.letter_for(max(hi, value))
    letter_range = (best,) if best == worst else (best, worst)
    estimated = tier == "E1"
    return Grade(
        scheme=scheme.name, scheme_version=scheme.version, metric=scheme.metric,
        value=float(value), interval=(lo, hi), letter=letter, letter_range=letter_range,
        worst_letter=worst, tier=tier, estimated=estimated,
        display=_display(letter, letter_range, tier, estimated),
    )


def _display(letter: str, letter_range: tuple[str, ...], tier: Tier, estimated: bool) -> str:
    marks = []
    if len(letter_range) > 1:
        marks.append(f"{letter_range[0]}-{letter_range[-1]}")
    if estimated:
        marks.append("estimated")
    elif tier == "M2":
        marks.append("M2")
    head = f"~{letter}" if estimated else letter
    return f"{head} ({', '.join(marks)})" if marks else head


def grade_comparison(comparison: Comparison, scheme: LabelScheme) -> Grade:
    """Grades a candidate's EEI against its baseline on a relative scheme.

    Args:
        comparison: baseline and candidate measured in the same run.
        scheme: a scheme with ``metric: eei``.

    Returns:
        The grade of ``comparison.eei`` with ``eei_ci``, at the worse of the two tiers.

    Raises:
        ConfigError: the scheme is not relative, or assumes another protocol.
    """
    if scheme.metric != "eei":
        raise ConfigError(f"label scheme {scheme.name} grades {scheme.metric}, not EEI; "
                          "use grade_measurement for absolute schemes")
    _check_protocol(scheme, comparison.candidate.protocol_id)
    return grade(comparison.eei, comparison.eei_ci, scheme, comparison.tier)


def grade_measurement(measurement: EnergyMeasurement, scheme: LabelScheme) -> Grade:
    """Grades a measured J/token on an absolute scheme.

    An absolute letter is only issued from M1/M2 figures; an E1 figure is still graded but
    its display is always marked estimated.

    Args:
        measurement: GO-1 figures of one model.
        scheme: a scheme with ``metric: joules_per_token``.

    Returns:
        The grade of ``joules_per_token`` with its interval, at the measurement's tier.

    Raises:
        ConfigError: the scheme is relative, or assumes another protocol.
    """
    if scheme.metric != "joules_per_token":
        raise ConfigError(f"label scheme {scheme.name} grades EEI, which needs a baseline; "
                          "use grade_comparison for relative schemes")
    _check_protocol(scheme, measurement.protocol_id)
    return grade(measurement.joules_per_token, measurement.joules_per_token_ci, scheme,
                 measurement.tier)


def _check_protocol(scheme: LabelScheme, protocol_id: str) -> None:
    if not scheme.accepts_protocol(protocol_id):
        raise ConfigError(f"label scheme {scheme.name} assumes protocol {scheme.protocol}, "
                          f"but the figure was measured under {protocol_id}")


# ---------------------------------------------------------------------------- carbon


def carbon_g_per_1k_tokens(joules_per_token: float,
                           intensity_g_per_kwh: float = DEFAULT_GRID_G_PER_KWH) -> float:
    """Grams CO2e per 1000 generated tokens (printed beside the class, never part of it).

    Args:
        joules_per_token: energy per generated token in J.
        intensity_g_per_kwh: grid carbon intensity in gCO2e/kWh (default 475, IEA world average).

    Returns:
        ``joules_per_token x 1000 / 3.6e6 x intensity`` in gCO2e; 1 J/token -> 0.132 g.

    Raises:
        ValueError: a negative or non-finite input.
    """
    for v in (joules_per_token, intensity_g_per_kwh):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"carbon needs finite non-negative inputs, got {v!r}")
    return joules_per_token * 1000.0 / _J_PER_KWH * intensity_g_per_kwh


def goal(scheme: str | Path | LabelScheme, letter: str, max_drop: float | None = None, *,
         flag: str = "--target") -> Goal:
    """The :class:`~greenopt.records.Goal` of reaching class ``letter`` of ``scheme``.

    Raises:
        ConfigError: an unknown scheme, or a letter that is not one of its classes (named
            as ``flag`` in the message).
    """
    s = load_scheme(scheme)
    if letter not in s.letters:
        raise ConfigError(f"{flag} {letter}: not a class of label scheme {s.name}; choose one of {', '.join(s.letters)}")
    return Goal(scheme=s, letter=letter, max_drop=max_drop)


__all__ = [
    "DEFAULT_GRID_G_PER_KWH", "Goal", "goal", "EU_INK", "EU_PALETTE", "Grade", "LabelClass", "LabelScheme", "carbon_g_per_1k_tokens",
    "grade", "grade_comparison", "grade_measurement", "load_scheme", "schemes_dir",
]
