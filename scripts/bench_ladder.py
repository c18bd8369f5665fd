"""The accuracy ladder against the old single-rung pick, on one finished search's trials.

Reads a search run folder (``greenopt search ... --name NAME``), and compares two ways of choosing
from the same trials:

- **ladder**: what the search chose (``pareto.select`` on the study's records, as ``export --pick
  best`` does): trials promoted through the rungs, the finalists and the baseline scored on
  ``final_limit`` items, confirmed energy;
- **one rung**: what the search did before the ladder: the feasible trial with the least loss
  on the first rung alone (``evaluation.limit`` items a task, 40 in the demo), on search-time
  energy (the trials the ladder confirmed are not the ones this rule would have confirmed).

Then it scores both picks and the baseline on ``--limit`` items a task (0: the full task sets)
and prints each pick's paired difference from the baseline there, and the ladder pick against
the one-rung pick (paired z). Both rules see the same trials, so this measures the choice, not
the sampler (which the ladder also steers, by telling it rung-corrected accuracies).
Accuracy only: nothing is timed, so it may run beside other work.

Usage:
    python scripts/bench_ladder.py runs/demo [--limit 0] [--out docs/bench/ladder.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from greenopt.config import SearchSpec, load_yaml, validated
from greenopt.env import cpu_flags, set_threads
from greenopt.evaluate import evaluate
from greenopt.evaluate.paired import paired_difference
from greenopt.label import goal as make_goal
from greenopt.label import load_scheme
from greenopt.models import load_model
from greenopt.records import TrialRecord
from greenopt.runtimes import TransformersRuntime, deploy
from greenopt.search.pareto import reaches, select
from greenopt.search.rundir import RunDir
from greenopt.ship.from_run import run_records


def one_rung_pick(records: list[TrialRecord], spec: SearchSpec) -> TrialRecord | None:
    """The feasible trial with the least first-rung loss (ties: lower energy), on search-time figures."""
    scheme = load_scheme(spec.scheme)
    g = make_goal(scheme, spec.target, spec.max_drop)
    ok = []
    for r in records:
        if r.is_baseline or not r.rungs or not reaches(r, g):
            continue
        drop = -r.rungs[0].delta
        if g.max_drop is None or drop <= g.max_drop + 1e-12:
            ok.append((drop, r.energy, r.number, r))
    return min(ok, key=lambda t: t[:3])[3] if ok else None


def main() -> int:
    a = _args()
    set_threads(a.threads)
    run = Path(a.run)
    print(f"machine: {platform.node()} / {platform.processor() or platform.machine()}; "
          f"CPU flags: {' '.join(cpu_flags()) or 'none of interest'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    spec = validated(SearchSpec, load_yaml(run / "search.yaml"), where=str(run / "search.yaml"))
    records = run_records(RunDir(run), spec)  # the study: the run's source of truth
    ladder = select(records, make_goal(load_scheme(spec.scheme), spec.target, spec.max_drop))
    old = one_rung_pick(records, spec)
    if ladder is None or old is None:
        print(f"nothing to compare: ladder pick {ladder and ladder.number}, one-rung pick {old and old.number}",
              file=sys.stderr)
        return 1
    print(f"{len(records)} trials; first rung {spec.evaluation.limit} items a task; rungs "
          f"{list(spec.evaluation.fidelity.ladder(spec.evaluation.limit))}")
    for name, r in (("ladder", ladder), ("one rung", old)):
        print(f"  {name} pick: trial {r.number} {r.variant_hash} ({_steps(r)}), first-rung delta "
              f"{100 * r.rungs[0].delta:+.1f} pts on {r.rungs[0].items} items a task")
    ev_spec = spec.evaluation.model_copy(update={"limit": a.limit or None})
    model, tok, _ = load_model(spec.model, dtype="auto", device="cpu")
    scored = {}
    start = time.perf_counter()
    scored["baseline"] = evaluate(TransformersRuntime(model, tok), tok, ev_spec, keep_items=True)
    picks = {"ladder": ladder} if ladder.number == old.number else {"ladder": ladder, "one rung": old}
    for name, r in picks.items():
        runtime, _ = deploy(copy.deepcopy(model), tok, r.variant, calib=spec.calibration)
        scored[name] = evaluate(runtime, tok, ev_spec, keep_items=True)
    if "one rung" not in scored:
        scored["one rung"] = scored["ladder"]
    eval_s = time.perf_counter() - start
    rows = {name: _paired(scored[name], scored["baseline"]) for name in ("ladder", "one rung")}
    versus = _paired(scored["ladder"], scored["one rung"]) if ladder.number != old.number else None
    items = "the full sets" if not a.limit else f"{a.limit} items a task"
    print(f"\nscored on {items} ({eval_s / 60:.1f} min), paired against the baseline on the same items:")
    for name, p in rows.items():
        print(f"  {name:8s} trial {picks.get(name, ladder).number}: {100 * p['diff']:+.2f} pts, paired SE "
              f"{100 * p['se']:.2f} ({p['n']} items)")
    if versus:
        print(f"  ladder vs one rung: {100 * versus['diff']:+.2f} pts, paired SE {100 * versus['se']:.2f}, "
              f"z {versus['z']:.1f}")
    else:
        print("  both rules picked the same trial")
    doc = {"run": str(run), "machine": platform.node(), "cpu_flags": list(cpu_flags()),
           "threads": torch.get_num_threads(), "items": a.limit or "all", "eval_s": round(eval_s, 1),
           "ladder": {"number": ladder.number, "variant_hash": ladder.variant_hash, "steps": _steps(ladder),
                      "first_rung_delta": ladder.rungs[0].delta, **rows["ladder"]},
           "one_rung": {"number": old.number, "variant_hash": old.variant_hash, "steps": _steps(old),
                        "first_rung_delta": old.rungs[0].delta, **rows["one rung"]},
           "ladder_vs_one_rung": versus}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


def _paired(cand, base) -> dict:
    """Mean over tasks of the per-task paired differences, with its standard error."""
    ds = [paired_difference(c.items, b.items) for c, b in zip(cand.scores, base.scores, strict=True)]
    diff = sum(d.diff for d in ds) / len(ds)
    se = math.sqrt(sum(d.stderr ** 2 for d in ds)) / len(ds)
    return {"diff": diff, "se": se, "z": diff / se if se else 0.0, "n": sum(d.n for d in ds),
            "tasks": {c.task: {"acc": c.value, "diff": d.diff, "se": d.stderr, "n": d.n}
                      for c, d in zip(cand.scores, ds, strict=True)}}


def _steps(r: TrialRecord) -> str:
    return ", ".join(s.kind for s in r.variant.steps) + f" on {r.variant.deploy.line()}"


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished search's run folder (runs/NAME)")
    p.add_argument("--limit", type=int, default=0, help="items per task to score the picks on (0: the full sets)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/bench/ladder.json")
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
