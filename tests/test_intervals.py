"""Intervals that hold between runs: paired in-run bootstrap, fresh starting sides, R comparisons combined."""

from __future__ import annotations

import math

import numpy as np
import pytest

from greenopt.assess import AssessSpec
from greenopt.config import protocol_preset
from greenopt.measure import stats, workload
from greenopt.measure.workload import compare, compare_repeated
from greenopt.testing import FakeMeter, tiny_llama, tiny_tokenizer


def test_paired_bootstrap_cancels_drift_both_sides_share():
    drift = [1.0, 1.3, 1.6, 1.9, 2.2]  # the machine slows down over the run, both sides alike
    base = drift
    cand = [0.9 * x for x in drift]
    lo, hi = stats.eei_interval_paired(base, cand, 2000, 0)
    assert lo == pytest.approx(90.0) and hi == pytest.approx(90.0)
    ilo, ihi = stats.eei_interval(base, cand, 2000, 0)  # independent resampling reads the drift as noise
    assert ihi - ilo > 40


def test_paired_bootstrap_shows_drift_that_separates_the_sides():
    base = [1.0, 1.0, 1.0, 1.0, 1.0]
    cand = [0.8, 0.9, 1.0, 1.1, 1.2]
    lo, hi = stats.eei_interval_paired(base, cand, 2000, 0)
    assert lo < 95 < 105 < hi


def test_combined_interval_holds_the_spread_between_comparisons():
    points = [88.1, 107.0, 94.8]  # three runs of one variant, each with a narrow in-run interval
    intervals = [(p - 3, p + 3) for p in points]
    eei, (lo, hi) = stats.combine_eei(points, intervals)
    assert eei == pytest.approx(math.exp(np.mean(np.log(points))))
    assert lo < min(points) and hi > max(points)  # t with 2 df: far wider than any in-run interval
    one, (lo1, hi1) = stats.combine_eei([94.8], [(91.8, 97.8)])
    assert one == pytest.approx(94.8) and lo1 == pytest.approx(91.8, rel=0.01) and hi1 == pytest.approx(97.8, rel=0.01)
    _, (flo, fhi) = stats.combine_eei([94.8], [(91.8, 97.8)], floor_log_sd=0.06)
    assert flo < lo1 and fhi > hi1  # the machine's noise floor widens a single comparison


def test_combined_interval_rejects_bad_input():
    with pytest.raises(ValueError):
        stats.combine_eei([90.0, 0.0], [(80, 100), (1, 2)])
    with pytest.raises(ValueError):
        stats.combine_eei([90.0], [(80, 100), (1, 2)])


def test_each_comparison_draws_and_records_its_own_starting_side(monkeypatch):
    seeds = iter(range(100))
    monkeypatch.setattr(workload.secrets, "randbits", lambda k: next(seeds))
    model, tok = tiny_llama(layers=2), tiny_tokenizer()
    firsts = set()
    for _ in range(6):
        c = compare(model, model, tok, protocol_preset("smoke"), FakeMeter())
        assert c.order_seed is not None and c.first in ("baseline", "candidate") and c.interval == "in-run"
        firsts.add(c.first)
    assert firsts == {"baseline", "candidate"}
    assert "in-run" in c.interval_note


def test_repeated_comparisons_build_fresh_pairs_and_combine():
    model, tok = tiny_llama(layers=2), tiny_tokenizer()
    built = []

    def pair(r):
        built.append(r)
        return tiny_llama(layers=2), tiny_llama(layers=2)

    energies = iter([1.0] * 10 + [2.0] * 2 + [1.0] * 100)
    c = compare_repeated(pair, tok, protocol_preset("smoke"), FakeMeter(energy_fn=lambda d: next(energies, 1.0)), 3)
    assert built == [0, 1, 2]
    assert c.interval == "repeated" and len(c.runs) == 3
    assert c.eei_ci[0] <= c.eei <= c.eei_ci[1]
    assert "over 3 comparisons" in c.interval_note
    single = compare_repeated(lambda r: (model, model), tok, protocol_preset("smoke"), FakeMeter(), 1)
    assert single.interval == "in-run" and single.runs == ()


def test_reported_figures_default_to_three_comparisons():
    assert AssessSpec().comparisons == 3
