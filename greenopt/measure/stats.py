"""Statistics for protocol GO-1: median over trials, bootstrap intervals, spread.

Pure functions over sequences of floats; every random draw comes from a seeded
``numpy.random.Generator``, so the same inputs and seed give the same interval.

    >>> median([3.0, 1.0, 2.0])
    2.0
    >>> coefficient_of_variation([1.0, 2.0, 3.0])
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_LEVEL = 0.95


def median(values: Sequence[float]) -> float:
    """The median of ``values``.

    Args:
        values: at least one number.

    Returns:
        The median (mean of the two middle values for an even count).

    Raises:
        ValueError: ``values`` is empty.
    """
    x = _array(values)
    return float(np.median(x))


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1) divided by the mean; 0.0 for fewer than two values.

    Args:
        values: at least one number with a non-zero mean.

    Returns:
        The coefficient of variation as a fraction (0.05 = 5%).

    Raises:
        ValueError: ``values`` is empty or its mean is zero.
    """
    x = _array(values)
    if x.size < 2:
        return 0.0
    mean = float(x.mean())
    if mean == 0.0:
        raise ValueError("coefficient of variation is undefined for a zero mean")
    return float(x.std(ddof=1) / abs(mean))


def bootstrap_median_ci(values: Sequence[float], resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the median.

    Args:
        values: the per-trial figures (e.g. J/token), at least one.
        resamples: number of bootstrap resamples (protocol.bootstrap_resamples).
        seed: seed of the ``numpy.random.Generator``.

    Returns:
        ``(low, high)``, the 2.5th and 97.5th percentiles of the resampled medians.

    Raises:
        ValueError: ``values`` is empty or ``resamples`` < 1.
    """
    x = _array(values)
    rng = np.random.default_rng(seed)
    meds = _resampled_medians(x, resamples, rng)
    return _percentile_interval(meds)


def eei_point(baseline_jpt: Sequence[float], candidate_jpt: Sequence[float]) -> float:
    """Energy efficiency index: 100 x median(candidate) / median(baseline).

    Args:
        baseline_jpt: baseline J/token per trial.
        candidate_jpt: candidate J/token per trial.

    Returns:
        The EEI (100 = same energy per token as the baseline).

    Raises:
        ValueError: either side is empty or the baseline median is not positive.
    """
    base = median(baseline_jpt)
    if base <= 0:
        raise ValueError(f"baseline median J/token must be positive, got {base}")
    return 100.0 * median(candidate_jpt) / base


def eei_interval(baseline_jpt: Sequence[float], candidate_jpt: Sequence[float],
                 resamples: int, seed: int) -> tuple[float, float]:
    """Bootstrap 95% interval of the EEI, resampling each side independently.

    Each resample draws the baseline trials and the candidate trials with replacement,
    separately, and computes 100 x median(candidate*) / median(baseline*).

    Args:
        baseline_jpt: baseline J/token per trial.
        candidate_jpt: candidate J/token per trial.
        resamples: number of bootstrap resamples (protocol.bootstrap_resamples).
        seed: seed of the ``numpy.random.Generator``.

    Returns:
        ``(low, high)`` EEI bounds.

    Raises:
        ValueError: either side is empty, ``resamples`` < 1, or a baseline value is not positive.
    """
    b, c = _array(baseline_jpt), _array(candidate_jpt)
    if (b <= 0).any():
        raise ValueError("baseline J/token values must be positive")
    rng = np.random.default_rng(seed)
    base_meds = _resampled_medians(b, resamples, rng)
    cand_meds = _resampled_medians(c, resamples, rng)
    return _percentile_interval(100.0 * cand_meds / base_meds)


def eei_interval_paired(baseline_jpt: Sequence[float], candidate_jpt: Sequence[float],
                        resamples: int, seed: int) -> tuple[float, float]:
    """Paired block bootstrap 95% interval of the EEI within one comparison.

    Trials alternate A B A B, so trial ``i`` of each side forms one adjacent pair that shared
    the machine's state at that moment; a resample draws whole pairs with replacement and
    computes 100 x median(candidate*) / median(baseline*). Drift that moves both sides of a
    pair together cancels instead of widening the interval, and drift that separates them
    shows. With unequal trial counts the extra trials of the longer side are left out.

    Raises:
        ValueError: either side is empty, ``resamples`` < 1, or a baseline value is not positive.
    """
    b, c = _array(baseline_jpt), _array(candidate_jpt)
    if (b <= 0).any():
        raise ValueError("baseline J/token values must be positive")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    n = min(b.size, c.size)
    b, c = b[:n], c[:n]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return _percentile_interval(100.0 * np.median(c[idx], axis=1) / np.median(b[idx], axis=1))


def combine_eei(points: Sequence[float], intervals: Sequence[tuple[float, float]],
                floor_log_sd: float = 0.0) -> tuple[float, tuple[float, float]]:
    """One EEI and 95% interval from R independent comparisons of the same pair.

    Works on log EEI. The point is the geometric mean of the R EEIs. The variance of one
    comparison is the between-comparison variance plus the mean within-comparison variance
    (each in-run interval read as +-1.96 sd on the log scale); the between term is the sample
    variance of the R log EEIs (ddof=1), but never less than the square of the machine's noise
    floor ``floor_log_sd`` (the between-comparison sd of A/A runs, from ``greenopt calibrate``):
    with R = 3 the sample variance alone is often far too small. The standard error divides by
    R; the interval uses Student's t with R-1 degrees of freedom, or the normal quantile for
    R = 1, where only the floor stands for the between term.

    Raises:
        ValueError: no point, a non-positive EEI or interval end, or lengths that differ.
    """
    x = _array(points)
    if len(intervals) != x.size:
        raise ValueError("need one interval per point")
    lo, hi = np.array([i[0] for i in intervals], dtype=np.float64), np.array([i[1] for i in intervals], dtype=np.float64)
    if (x <= 0).any() or (lo <= 0).any() or (hi <= 0).any():
        raise ValueError("EEI values and interval ends must be positive")
    logs, r = np.log(x), x.size
    within = float(np.mean(((np.log(hi) - np.log(lo)) / (2 * _Z95)) ** 2))
    between = max(float(np.var(logs, ddof=1)) if r > 1 else 0.0, floor_log_sd ** 2)
    se = math.sqrt((between + within) / r)
    q = _t95(r - 1) if r > 1 else _Z95
    centre = float(np.mean(logs))
    return math.exp(centre), (math.exp(centre - q * se), math.exp(centre + q * se))


_Z95 = 1.959963984540054
# Two-sided 95% Student t quantiles by degrees of freedom (1..30); larger df use the normal.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else _Z95


def _array(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("need at least one value")
    return x


def _resampled_medians(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    return np.median(x[idx], axis=1)


def _percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    tail = 100.0 * (1.0 - _LEVEL) / 2.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)
