"""benchlib: the dequantized twin, accuracy means, dominance verdicts and the plot."""

from __future__ import annotations

import math

import pytest
import torch
from benchlib import (
    DequantizedTwin,
    Point,
    dominance,
    group_near,
    mean_accuracy,
    plot_png,
    twinnable,
    verdict,
)

from greenopt.compress import apply
from greenopt.config import DepthStep, QuantizeStep, QuantOverride, Target, Variant
from greenopt.records import TaskScore
from greenopt.testing import tiny_llama


def _pt(name, eei, acc, se=0.01, ci=5.0, **kw):
    return Point(name=name, kind="baseline", variant_hash=name, eei=eei, eei_ci=(eei - ci, eei + ci),
                 accuracy=acc, accuracy_se=se, **kw)


@pytest.mark.parametrize("method,bits,gs", [("hqq", 4, 32), ("rtn", 3, 16), ("torchao_int8", 8, None)])
def test_the_twin_gives_the_quantized_models_logits_and_undoes_itself(method, bits, gs):
    torch.manual_seed(0)
    m = tiny_llama()
    apply(m, Variant(steps=[QuantizeStep(method=method, bits=bits, group_size=gs)]))
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    real = m(ids).logits.detach()
    kinds = {n: type(x) for n, x in m.named_modules()}
    with DequantizedTwin(m, ids) as twin:
        assert twin.swapped == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
        assert all(type(x) is torch.nn.Linear for n, x in m.named_modules() if n.endswith("proj"))
        assert twin.agreement["top1_agree"] == 1.0
        assert twin.agreement["max_abs_diff"] < 1e-4 * max(1.0, twin.agreement["logit_std"])
        assert torch.allclose(m(ids).logits, real, atol=1e-4)
    assert {n: type(x) for n, x in m.named_modules()} == kinds
    assert torch.equal(m(ids).logits, real)


def test_a_plain_model_has_nothing_to_twin():
    m = tiny_llama()
    with DequantizedTwin(m) as twin:
        assert twin.swapped == 0


def test_only_weight_only_quantization_is_twinnable():
    assert twinnable(Variant(steps=[QuantizeStep(method="bnb_nf4", bits=4)]))
    assert twinnable(Variant(steps=[QuantizeStep(method="hqq", bits=4), DepthStep(drop=2)]))
    assert not twinnable(Variant(steps=[QuantizeStep(method="bnb_int8", bits=8, group_size=None)]))
    assert not twinnable(Variant(steps=[DepthStep(drop=2)]))
    mixed = QuantizeStep(method="hqq", bits=4, overrides=(QuantOverride(target=Target(include=("*o_proj",)),
                                                                        bits=8, method="bnb_int8"),))
    assert not twinnable(Variant(steps=[mixed]))


def test_group_near_keeps_a_dividing_size_and_else_takes_the_nearest_divisor():
    assert group_near(128, [1024, 4096]) == 128
    assert group_near(128, [576, 1536]) == 96  # SmolLM2-135M: 128 does not divide 576
    assert group_near(64, [576, 1536]) == 64


def test_mean_accuracy_averages_tasks_and_combines_their_errors():
    s = [TaskScore(task="a", metric="acc", value=0.4, stderr=0.03, n=500),
         TaskScore(task="b", metric="acc", value=0.6, stderr=0.04, n=500),
         TaskScore(task="w", metric="word_perplexity", value=30.0, n=10, higher_is_better=False)]
    mean, se = mean_accuracy(s)
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.025)
    with pytest.raises(ValueError):
        mean_accuracy(s[2:])


def test_dominance_needs_both_objectives_no_worse_and_one_better():
    a, b = _pt("a", 80, 0.50), _pt("b", 90, 0.45)
    d = dominance(a, b)
    assert d.dominates and d.accuracy_gain == pytest.approx(0.05) and d.eei_saving == pytest.approx(10)
    assert d.accuracy_z == pytest.approx(0.05 / math.hypot(0.01, 0.01)) and not d.eei_separated
    assert not dominance(b, a).dominates
    assert not dominance(a, a).dominates
    assert not dominance(_pt("c", 70, 0.40), a).dominates  # cheaper but less accurate
    assert dominance(_pt("far", 50, 0.5, ci=2), _pt("near", 80, 0.5, ci=2)).eei_separated


def test_verdict_names_each_baseline_with_its_margins():
    pick = _pt("pick", 80, 0.50, display="~D")
    lines = verdict(pick, [_pt("x", 90, 0.45, display="~E"), _pt("y", 70, 0.52, display="~D"),
                           Point(name="z", kind="baseline", variant_hash="z", eei=math.nan,
                                 eei_ci=(math.nan, math.nan), error="boom")])
    assert "x (~E): dominated" in lines[0] and "+5.0 pts" in lines[0]
    assert "y (~D): NOT dominated" in lines[1] and "-2.0 pts" in lines[1] and "EEI +10.0" in lines[1]
    assert "z: not compared (boom)" in lines[2]


def test_the_plot_is_written(tmp_path):
    from greenopt.label import load_scheme

    pts = [_pt("base", 100, 0.45), _pt("depth", 78, 0.40), _pt("pick", 85, 0.44).model_copy(update={"kind": "greenopt"})]
    out = tmp_path / "s.png"
    plot_png(pts, load_scheme("relative-eu"), str(out), front=[(85, 0.44), (95, 0.45)], title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_ladder_picks_by_the_first_rung_among_feasible_trials():
    """The one-rung rule: least first-rung loss among trials whose search-time class reaches the target."""
    from bench_ladder import one_rung_pick

    from greenopt.config import DepthStep, SearchSpec, Variant
    from greenopt.label import grade_comparison, load_scheme
    from greenopt.records import EvalResult, RungScore, TaskScore, TrialRecord
    from greenopt.testing.search import fake_comparison

    def rec(number, first_delta, eei, last_delta=None):
        cmp = fake_comparison(eei, 2)
        rungs = [RungScore(limit=40, n=80, mean_accuracy=0.6 + first_delta, baseline_accuracy=0.6)]
        if last_delta is not None:
            rungs.append(RungScore(limit=300, n=600, mean_accuracy=0.6 + last_delta, baseline_accuracy=0.6))
        return TrialRecord(number=number, state="COMPLETE", variant=Variant(steps=(DepthStep(drop=number),)),
                           variant_hash=f"h{number}", eval=EvalResult(scores=(TaskScore(task="a", metric="acc",
                           value=0.6 + rungs[-1].delta, n=rungs[-1].n),), limit=40, seed=0), baseline_accuracy=0.6,
                           comparison=cmp,
                           grade=grade_comparison(cmp, load_scheme("relative-eu")), energy=cmp.eei,
                           energy_ci=cmp.eei_ci, rungs=tuple(rungs))

    spec = SearchSpec(target="A", max_drop=0.05)
    recs = [rec(1, -0.04, 30.0, last_delta=-0.01),  # climbed: better on 300 items than it looked on 40
            rec(2, -0.01, 30.0),  # lucky on 40 items: the one-rung rule takes it
            rec(3, 0.02, 80.0),  # most accurate, but class D: not feasible
            rec(4, -0.10, 30.0)]  # over the drop budget
    assert one_rung_pick(recs, spec).number == 2
    assert one_rung_pick(recs[2:], spec) is None
