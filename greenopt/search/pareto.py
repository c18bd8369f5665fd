"""Pure functions over trial records: the Pareto front, hypervolume, selection, the unreachable report.

Objectives: maximize mean accuracy, minimize energy (EEI for relative schemes, J/token for
absolute ones). Only COMPLETE trials, whose energy was measured under the full protocol,
enter the front or can be chosen; a label is never predicted.

Example:
    >>> from greenopt.search.pareto import front, select
    >>> rows = front(records)                                  # doctest: +SKIP
    >>> chosen = select(records, goal(scheme, "B", max_drop=0.05))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from greenopt.config import Variant
from greenopt.label import LabelScheme
from greenopt.records import ClosestRow, FrontRow, Goal, TrialRecord, Unreachable

# ---------------------------------------------------------------------------- front


def front(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Non-dominated measured trials on (accuracy max, energy min), best accuracy first.

    A trial is dominated when another is at least as accurate and at most as costly, and
    strictly better in one; identical points are all kept. Accuracy is
    :attr:`~greenopt.records.TrialRecord.search_accuracy` (paired against the baseline, so trials
    scored on different rungs compare fairly).
    """
    pts = sorted((r for r in records if r.measured), key=lambda r: (-r.search_accuracy, r.energy, r.number))
    out: list[TrialRecord] = []
    best_e = math.inf  # lowest energy among strictly better-sorted points
    i = 0
    while i < len(pts):
        j = i
        key = (pts[i].search_accuracy, pts[i].energy)
        while j < len(pts) and (pts[j].search_accuracy, pts[j].energy) == key:
            j += 1
        if key[1] < best_e:
            out.extend(pts[i:j])
            best_e = key[1]
        i = j
    return out


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``(accuracy, energy)`` points and bounded by ``ref`` (accuracy, energy).

    Accuracy is maximised and energy minimised; points not better than ``ref`` in both
    contribute nothing. Units: accuracy x energy unit.
    """
    pts = [(a, e) for a, e in points if a > ref[0] and e < ref[1]]
    pts.sort(key=lambda p: (p[1], -p[0]))
    area, best_a = 0.0, ref[0]
    stair: list[tuple[float, float]] = []
    for a, e in pts:
        if a > best_a:
            stair.append((a, e))
            best_a = a
    for k, (a, e) in enumerate(stair):
        e_next = stair[k + 1][1] if k + 1 < len(stair) else ref[1]
        area += (a - ref[0]) * (e_next - e)
    return area


# ---------------------------------------------------------------------------- selection


def target_bound(scheme: LabelScheme, target: str) -> float:
    """Upper bound of the target class in the scheme's metric (inf for the open last class).

    Raises:
        ValueError: the letter is not a class of the scheme.
    """
    if target not in scheme.letters:
        raise ValueError(f"class {target!r} is not in label scheme {scheme.name} ({', '.join(scheme.letters)})")
    return Goal(scheme=scheme, letter=target).bound


def reaches(record: TrialRecord, goal: Goal) -> bool:
    """Whether the worse letter of the trial's interval is the goal's class or better."""
    if not record.measured or record.grade is None:
        return False
    letters = goal.scheme.letters
    return letters.index(record.grade.worst_letter) <= letters.index(goal.letter)


def constraint_values(record: TrialRecord, goal: Goal) -> tuple[float, ...]:
    """Constraint values for the sampler (<= 0 feasible): class bound, then accuracy drop.

    The first is ``worse end of the energy interval - class bound``; the second, present when
    ``goal.max_drop`` is set, ``accuracy drop - max_drop``. Unmeasured trials get 1.0.
    """
    n = 1 if goal.max_drop is None else 2
    if not record.measured:
        return (1.0,) * n
    bound = goal.bound
    out = [-1.0 if math.isinf(bound) else record.energy_worst - bound]
    if goal.max_drop is not None:
        drop = record.accuracy_drop
        out.append(1.0 if drop is None else drop - goal.max_drop)
    return tuple(out)


def feasible(record: TrialRecord, goal: Goal) -> bool:
    """Reaches the goal's class and, when set, stays within its accuracy drop budget."""
    if not reaches(record, goal):
        return False
    drop = record.accuracy_drop
    return goal.max_drop is None or (drop is not None and drop <= goal.max_drop + 1e-12)


def select(records: Iterable[TrialRecord], goal: Goal) -> TrialRecord | None:
    """The feasible trial with the least accuracy loss versus the baseline (ties: lower energy).

    Once the search has confirmed trials (fresh repeated comparisons after the budget), only
    confirmed trials can be chosen, on their confirmed figures; finalists scored on the final
    item set are judged on that accuracy (paired against the baseline on the same items).

    Args:
        records: trial records of one study.
        goal: the class to reach (the worse letter of each interval counts) and the
            optional accuracy-drop budget (fraction, 0.05 = 5 points).

    Returns:
        The chosen record, or None when no trial is feasible.
    """
    records = list(records)
    if any(r.confirmed is not None for r in records):  # confirmed figures decide, and only they
        records = [r for r in records if r.confirmed is not None]
    ok = [r for r in (r.confirmed_view() for r in records) if feasible(r, goal)]
    if not ok:
        return None
    return min(ok, key=lambda r: (r.accuracy_drop if r.accuracy_drop is not None else math.inf,
                                  r.energy, r.number))


def unreachable(records: Sequence[TrialRecord], goal: Goal, k: int = 3) -> Unreachable:
    """Explains why no trial reached ``target``: counts, reasons, and the ``k`` closest variants.

    Closest = lowest worse end of the energy interval among measured trials.
    """
    counts = Counter(r.state for r in records if not r.lost)
    counts["lost"] = sum(r.lost for r in records)
    prunes = Counter(_reason_kind(r.reason) for r in records if r.state == "PRUNED")
    fails = Counter(_reason_kind(r.reason) for r in records if r.state == "FAIL" and not r.lost)
    bound, target, max_drop = goal.bound, goal.letter, goal.max_drop
    near = sorted((r for r in records if r.measured and not r.is_baseline), key=lambda r: (r.energy_worst, r.number))
    rows = [ClosestRow(number=r.number, variant_hash=r.variant_hash, display=r.grade.display if r.grade else "?",
                       energy=r.energy, energy_worst=r.energy_worst, accuracy_drop=r.accuracy_drop,
                       limited_by=_limit(r, goal)) for r in near[:k]]
    unit = goal.unit
    ran = sum(counts[s] for s in ("COMPLETE", "PRUNED", "FAIL"))  # trials that ran to an outcome (lost excluded)
    parts = [f"{counts['COMPLETE']} complete", f"{counts['PRUNED']} pruned", f"{counts['FAIL']} failed"]
    if fails:
        parts[-1] += " (" + ", ".join(f"{kind} x{n}" for kind, n in fails.most_common()) + ")"
    if counts["lost"]:
        parts.append(f"{counts['lost']} lost (not counted)")
    msg = (f"No variant reached class {target} (<= {bound:g} {unit}, worse end of the 95% interval"
           + (f", accuracy drop <= {max_drop:g}" if max_drop is not None else "") + ") in "
           + f"the {ran} trial{'' if ran == 1 else 's'} that ran: " + ", ".join(parts) + ".")
    if rows:
        msg += f" Closest: trial {rows[0].number} at {unit} {rows[0].energy_worst:.3g} (worse end), {rows[0].display}."
    elif any(r.measured for r in records):
        msg += " No variant besides the baseline was fully measured."
    else:
        msg += " No trial was fully measured, the baseline included."
    return Unreachable(message=msg, closest=tuple(rows), counts=dict(counts), prune_reasons=dict(prunes),
                       fail_reasons=dict(fails))


def _reason_kind(reason: str | None) -> str:
    return (reason or "unknown").split(":")[0].strip()


def _limit(r: TrialRecord, goal: Goal) -> str:
    why, bound, max_drop = [], goal.bound, goal.max_drop
    if not reaches(r, goal):
        why.append(f"class {r.grade.worst_letter if r.grade else '?'} at the worse end "
                   f"({r.energy_worst:.3g} > {bound:g})")
    drop = r.accuracy_drop
    if max_drop is not None and drop is not None and drop > max_drop:
        why.append(f"accuracy drop {drop:.3f} > {max_drop:g}")
    return "; ".join(why) or "feasible"


# ---------------------------------------------------------------------------- table rows


def row(record: TrialRecord, *, chosen: bool = False, on_front: bool = False) -> FrontRow:
    """The table row of a measured record (``record.measured`` must hold); a confirmed record
    shows its confirmed figures with the search-time ones beside them."""
    searched = record
    confirmed = record.confirmed is not None and record.confirmed_grade is not None
    record = record.confirmed_view()
    c, g = record.comparison, record.grade
    assert c is not None and g is not None and record.eval is not None
    return FrontRow(
        number=record.number, variant_hash=record.variant_hash, steps=describe(record.variant),
        is_baseline=record.is_baseline, chosen=chosen, on_front=on_front,
        accuracy={s.task: s.value for s in record.eval.scores}, mean_accuracy=record.mean_accuracy,
        accuracy_drop=record.accuracy_drop, energy=record.energy, energy_ci=record.energy_ci or (record.energy,) * 2,
        joules_per_token=c.candidate.joules_per_token, joules_per_token_ci=c.candidate.joules_per_token_ci,
        tier=c.tier, eei=c.eei, eei_ci=c.eei_ci, display=g.display, worst_letter=g.worst_letter,
        estimated=g.estimated, weight_bytes=record.apply.weight_bytes_after if record.apply else None,
        tokens_per_s=c.candidate.tokens_per_s, confirmed=confirmed,
        search_energy=searched.energy if confirmed else None,
        search_display=searched.grade.display if confirmed and searched.grade else None,
        items_per_task=record.eval.limit,
        accuracy_drop_se=record.rungs[-1].paired.stderr if record.rungs and record.rungs[-1].paired else None,
    )


def describe(variant: Variant) -> str:
    """A short human summary of a variant's steps, e.g. ``drop 3 · ffn 0.75 · 2:4 · q4 (+2)``."""
    if variant.is_baseline:
        return "baseline"
    out = []
    for s in variant.steps:
        if s.kind == "depth":
            out.append(f"drop {s.drop}" if s.layers is None else f"drop {s.layers}")
        elif s.kind == "width":
            out.append(" ".join(x for x in (f"ffn {s.ffn_keep:g}" if s.ffn_keep < 1 else "",
                                             f"heads {s.heads_keep:g}" if s.heads_keep < 1 else "") if x))
        elif s.kind == "moefy":
            out.append(f"moe {s.top_k}/{s.experts}")
        elif s.kind == "expert_prune":
            out.append(f"experts {s.keep:g}")
        elif s.kind == "prune":
            out.append("2:4" if s.pattern == "2:4" else f"sparse {s.sparsity:g}")
        elif s.kind == "quantize":
            if "lm_head" in s.target.include:
                out.append(f"head q{s.bits}")
            else:
                bits = sorted({s.bits} | {o.bits for o in s.overrides if o.bits}, reverse=True)
                out.append(f"{s.method} " + "/".join(f"q{b}" if b != 16 else "16" for b in bits))
        elif s.kind == "heal":
            out.append(f"heal {s.steps}")
    d = variant.deploy
    if not d.is_reference:  # the runtime last: "drop 3 · onnxruntime-genai int4 b32 acc4", "rtn q4 · bfloat16"
        out.append(d.describe().removeprefix("transformers "))
    return " · ".join(out)
