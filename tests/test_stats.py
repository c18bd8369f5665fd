"""Statistics of protocol GO-1 against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from greenopt.measure import stats


def test_median_known_values():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        stats.median([])


def test_coefficient_of_variation_known_values():
    assert stats.coefficient_of_variation([1.0, 2.0, 3.0]) == pytest.approx(0.5)  # sd 1, mean 2
    assert stats.coefficient_of_variation([1.0, 1.1, 0.9, 1.0, 1.0]) == pytest.approx(math.sqrt(0.005))
    assert stats.coefficient_of_variation([7.0]) == 0.0
    assert stats.coefficient_of_variation([5.0, 5.0, 5.0]) == 0.0
    with pytest.raises(ValueError, match="zero mean"):
        stats.coefficient_of_variation([-1.0, 1.0])


def test_bootstrap_ci_constant_is_exact():
    assert stats.bootstrap_median_ci([2.0] * 5, resamples=500, seed=0) == (2.0, 2.0)


def test_bootstrap_ci_brackets_median_and_is_seeded():
    x = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.3]
    lo, hi = stats.bootstrap_median_ci(x, resamples=2000, seed=7)
    assert min(x) <= lo <= stats.median(x) <= hi <= max(x)
    assert (lo, hi) == stats.bootstrap_median_ci(x, resamples=2000, seed=7)
    assert lo < hi


def test_bootstrap_ci_matches_reference_computation():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    rng = np.random.default_rng(3)
    idx = rng.integers(0, x.size, size=(1000, x.size))
    ref = np.percentile(np.median(x[idx], axis=1), [2.5, 97.5])
    assert stats.bootstrap_median_ci(list(x), resamples=1000, seed=3) == pytest.approx(tuple(ref))


def test_bootstrap_needs_resamples():
    with pytest.raises(ValueError):
        stats.bootstrap_median_ci([1.0, 2.0], resamples=0, seed=0)


def test_eei_point_and_exact_interval():
    base, cand = [2.0] * 5, [1.0] * 5
    assert stats.eei_point(base, cand) == 50.0
    assert stats.eei_interval(base, cand, resamples=300, seed=0) == (50.0, 50.0)


def test_eei_interval_contains_point_and_resamples_each_side():
    base = [1.0, 1.02, 0.98, 1.01, 0.99]
    cand = [0.6, 0.62, 0.58, 0.61, 0.59]
    lo, hi = stats.eei_interval(base, cand, resamples=2000, seed=1)
    point = stats.eei_point(base, cand)
    assert point == pytest.approx(60.0)
    assert lo <= point <= hi
    # The extremes of resampled medians bound the interval: 100 x 0.58/1.02 .. 100 x 0.62/0.98.
    assert 100 * 0.58 / 1.02 - 1e-9 <= lo and hi <= 100 * 0.62 / 0.98 + 1e-9
    assert (lo, hi) == stats.eei_interval(base, cand, resamples=2000, seed=1)


def test_eei_interval_matches_reference_computation():
    base, cand = np.array([1.0, 1.3, 0.8, 1.1, 0.9, 1.2]), np.array([0.5, 0.7, 0.55, 0.65, 0.6])
    rng = np.random.default_rng(5)
    b = np.median(base[rng.integers(0, base.size, size=(1500, base.size))], axis=1)
    c = np.median(cand[rng.integers(0, cand.size, size=(1500, cand.size))], axis=1)
    ref = np.percentile(100 * c / b, [2.5, 97.5])
    assert stats.eei_interval(list(base), list(cand), resamples=1500, seed=5) == pytest.approx(tuple(ref))


def test_eei_interval_same_data_contains_100():
    x = [1.0, 1.1, 0.95, 1.05, 0.9, 1.02, 0.97]
    lo, hi = stats.eei_interval(x, x, resamples=2000, seed=0)
    assert lo < 100.0 < hi


def test_eei_rejects_non_positive_baseline():
    with pytest.raises(ValueError):
        stats.eei_point([0.0], [1.0])
    with pytest.raises(ValueError):
        stats.eei_interval([0.0, 1.0], [1.0, 1.0], resamples=100, seed=0)
