"""Pareto front, hypervolume and selection: against brute force and at class boundaries."""

import itertools
import math
import random

import pytest

from greenopt.config import DepthStep, Variant
from greenopt.label import goal, grade, load_scheme
from greenopt.records import EvalResult, TaskScore, TrialRecord
from greenopt.search.pareto import (
    constraint_values,
    describe,
    feasible,
    front,
    hypervolume,
    reaches,
    select,
    target_bound,
    unreachable,
)

EU = load_scheme("relative-eu")


def rec(number, acc, eei, ci=None, *, state="COMPLETE", base_acc=0.6, tier="M1", reason=None, baseline=False):
    ci = ci or (eei, eei)
    measured = state == "COMPLETE"
    variant = Variant() if baseline else Variant(steps=[DepthStep(drop=number + 1)])
    return TrialRecord(
        number=number, state=state, variant=variant, variant_hash=variant.hash, is_baseline=baseline,
        reason=reason, baseline_accuracy=base_acc,
        eval=EvalResult(scores=(TaskScore(task="t", metric="acc", value=acc, n=100),), limit=100, seed=0)
        if measured else None,
        grade=grade(eei, ci, EU, tier) if measured else None,
        energy=eei if measured else None, energy_ci=ci if measured else None)


def brute_front(records):
    pts = [r for r in records if r.measured]

    def dominates(a, b):
        return (a.mean_accuracy >= b.mean_accuracy and a.energy <= b.energy
                and (a.mean_accuracy > b.mean_accuracy or a.energy < b.energy))

    return {r.number for r in pts if not any(dominates(o, r) for o in pts)}


@pytest.mark.parametrize("seed", range(25))
def test_front_equals_brute_force(seed):
    rng = random.Random(seed)
    grid = rng.choice([None, 5])  # coarse grid -> many ties and duplicates
    records = []
    for i in range(rng.randint(1, 40)):
        a, e = rng.random(), rng.uniform(10, 130)
        if grid:
            a, e = round(a * grid) / grid, round(e / 20) * 20
        state = rng.choice(["COMPLETE"] * 5 + ["PRUNED", "FAIL"])
        records.append(rec(i, a, e, state=state))
    assert {r.number for r in front(records)} == brute_front(records)


def test_front_is_sorted_by_accuracy_and_skips_unmeasured():
    records = [rec(0, 0.6, 100), rec(1, 0.5, 50), rec(2, 0.55, 80), rec(3, 0.9, 10, state="PRUNED")]
    assert [r.number for r in front(records)] == [0, 2, 1]


def brute_hv(points, ref):
    xs = sorted({ref[1]} | {e for _, e in points})
    ys = sorted({ref[0]} | {a for a, _ in points})
    area = 0.0
    for (e0, e1), (a0, a1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if e0 >= ref[1] or a1 <= ref[0]:
            continue
        if any(a >= a1 and e <= e0 for a, e in points):
            area += (e1 - e0) * (a1 - a0)
    return area


@pytest.mark.parametrize("seed", range(15))
def test_hypervolume_equals_brute_force(seed):
    rng = random.Random(seed)
    pts = [(round(rng.random(), 2), round(rng.uniform(0, 120), 1)) for _ in range(rng.randint(0, 15))]
    ref = (0.1, 110.0)
    assert hypervolume(pts, ref) == pytest.approx(brute_hv(pts, ref))


def test_hypervolume_simple_case():
    assert hypervolume([(0.5, 50.0)], (0.0, 100.0)) == pytest.approx(25.0)
    assert hypervolume([(0.5, 50.0), (0.8, 80.0)], (0.0, 100.0)) == pytest.approx(0.5 * 30 + 0.8 * 20)
    assert hypervolume([(0.5, 150.0)], (0.0, 100.0)) == 0.0


# --------------------------------------------------------------------- selection at class boundaries

@pytest.mark.parametrize("eei, ci, ok", [
    (50.0, (49.0, 51.0), True),     # worse end exactly on B's bound (51): still B
    (50.0, (49.0, 51.01), False),   # interval straddles into C: the worse letter C counts
    (41.0, (41.0, 41.0), True),     # point on A/B bound is A, which is better than B
    (52.0, (50.0, 53.0), False),    # point C
    (45.0, (40.0, 50.0), True),     # A-B interval: worse letter B reaches B
])
def test_reaches_uses_the_worse_letter(eei, ci, ok):
    r = rec(1, 0.5, eei, ci)
    assert reaches(r, goal(EU, "B")) is ok
    c = constraint_values(r, goal(EU, "B", None))
    assert (c[0] <= 0) is ok  # the sampler's constraint agrees with the grade


def test_select_least_accuracy_loss_among_feasible():
    records = [
        rec(0, 0.60, 100, (97, 103), baseline=True),  # class E
        rec(1, 0.59, 50, (48, 52)),              # most accurate, but straddles B-C
        rec(2, 0.57, 49, (47, 51)),              # B: feasible
        rec(3, 0.55, 30, (28, 32)),              # A: feasible, less accurate
        rec(4, 0.58, 20, (19, 21), state="PRUNED"),
    ]
    assert select(records, goal(EU, "B")).number == 2
    assert select(records, goal(EU, "A")).number == 3
    assert select(records, goal(EU, "E")).number == 1   # the baseline straddles E-F, so only F counts
    assert select(records, goal(EU, "F")).number == 0   # the baseline itself reaches F
    assert select(records, goal(EU, "B", 0.04)).number == 2
    assert select(records, goal(EU, "B", 0.02)) is None


def test_select_ties_go_to_lower_energy():
    records = [rec(1, 0.57, 49, (47, 50)), rec(2, 0.57, 45, (44, 46)), rec(3, 0.57, 45, (44, 46))]
    assert select(records, goal(EU, "B")).number == 2


def test_max_drop_constraint_and_feasible_agree():
    rng = random.Random(0)
    for i in range(200):
        eei = rng.uniform(20, 120)
        r = rec(i, rng.uniform(0.4, 0.6), eei, (eei - rng.uniform(0, 8), eei + rng.uniform(0, 8)))
        c = constraint_values(r, goal(EU, "C", 0.05))
        assert len(c) == 2
        assert all(x <= 0 for x in c) == feasible(r, goal(EU, "C", 0.05))


def test_unmeasured_trials_violate_constraints_and_open_class_never_binds():
    assert constraint_values(rec(1, 0, 0, state="PRUNED"), goal(EU, "B", 0.1)) == (1.0, 1.0)
    assert constraint_values(rec(1, 0.5, 500, (400, 600)), goal(EU, "G", None)) == (-1.0,)
    assert math.isinf(target_bound(EU, "G"))
    with pytest.raises(ValueError, match="not in label scheme"):
        target_bound(EU, "Z")


def test_estimated_grades_are_still_selected_but_marked():
    r = rec(1, 0.58, 45, (44, 46), tier="E1")
    assert select([r], goal(EU, "B")).grade.display.startswith("~B")


def test_unreachable_report_names_counts_and_closest():
    records = [
        rec(0, 0.60, 100, (97, 103), baseline=True),
        rec(1, 0.58, 55, (50, 58)),
        rec(2, 0.50, 47, (45, 52)),   # B-C: closest by worse end (52 < 58)
        rec(3, 0, 0, state="PRUNED", reason="perplexity: 9x"),
        rec(4, 0, 0, state="FAIL", reason="out of memory: CUDA"),
    ]
    u = unreachable(records, goal(EU, "A", 0.05))
    assert u.counts["COMPLETE"] == 3 and u.counts["PRUNED"] == 1 and u.counts["FAIL"] == 1
    assert [c.number for c in u.closest] == [2, 1]
    assert "class C" in u.closest[0].limited_by and "accuracy drop 0.100" in u.closest[0].limited_by
    assert u.prune_reasons == {"perplexity": 1} and u.fail_reasons == {"out of memory": 1}
    assert u.message.startswith("No variant reached class A")


def test_describe_is_short_and_readable():
    assert describe(Variant()) == "baseline"
    assert describe(Variant(steps=[DepthStep(drop=3)])) == "drop 3"
