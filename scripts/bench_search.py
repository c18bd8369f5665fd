"""Benchmark greenopt's sampler against random search on a pool of cached trial results.

The pool is the deterministic SURROGATE of ``greenopt.testing.search`` (FakeRunner's
accuracy/energy model, shaped after ENERGY.md §1), evaluated over the default search space
for a 30-layer model (the default SmolLM2-135M's depth) and cached by variant hash. It is
not a set of measurements: it compares how fast samplers find a good front on a fixed,
plausible landscape, at no measuring cost. (Real cached results cannot serve as a pool: a
sampler proposes variants nobody measured.)

For each sampler and seed the study runs exactly as ``greenopt search`` drives it (baseline
enqueued as trial 0, the same space, the target class as a constraint, NSGA-II's small
population), and the hypervolume of the front on (mean accuracy max, EEI min) is recorded
after every trial. Reference point: accuracy 0.375 (chance on arc_easy + piqa), EEI 110.

Usage:
    python scripts/bench_search.py [--trials 200] [--seeds 10] [--target B] [--samplers nsga2,tpe,random]

Prints mean hypervolume vs trials; the trial count at which each sampler first reaches 95%
of the mean 200-trial random-search hypervolume (median over seeds, "-" = not reached); and
the best accuracy within the target class vs trials (what ``greenopt search`` selects on).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import optuna

from greenopt.config import SearchSpec, SpaceSpec
from greenopt.label import load_scheme
from greenopt.search.pareto import hypervolume, target_bound
from greenopt.search.space import baseline_params, sample
from greenopt.search.storage import make_sampler
from greenopt.testing.search import BASE_ACCURACY, CHANCE, surrogate

NUM_LAYERS = 30
REF = (sum(CHANCE.values()) / len(CHANCE), 110.0)
CHECKPOINTS = (10, 20, 30, 50, 75, 100, 150, 200)


class Pool:
    """Surrogate results cached by variant hash (a repeated variant costs nothing)."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[float, float]] = {}

    def __call__(self, variant) -> tuple[float, float]:
        if variant.hash not in self.cache:
            eei, loss, _ = surrogate(variant, NUM_LAYERS)
            accs = [max(CHANCE[t], BASE_ACCURACY[t] - loss * (1.0 + 0.2 * i)) for i, t in enumerate(BASE_ACCURACY)]
            self.cache[variant.hash] = (sum(accs) / len(accs), eei)
        return self.cache[variant.hash]


def run(sampler: str, seed: int, n_trials: int, target: float, constrain: bool, space: SpaceSpec,
        pool: Pool) -> tuple[list[float], list[float]]:
    """Hypervolume, and best accuracy within the target class, after each trial of one seeded study.

    ``target`` is the class bound (EEI); ``constrain`` passes it to the sampler as a constraint.
    """
    spec = SearchSpec(sampler=sampler, n_trials=n_trials, seed=seed, space=space)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(spec))
    study.enqueue_trial(baseline_params(space, NUM_LAYERS))
    points, curve, best, feasible = [], [], [], REF[0]
    for _ in range(n_trials):
        trial = study.ask()
        acc, eei = pool(sample(trial, space, NUM_LAYERS))
        if constrain:
            trial.set_constraint("class", eei - target)
        study.tell(trial, [acc, eei])
        points.append((acc, eei))
        curve.append(hypervolume(points, REF))
        feasible = max(feasible, acc) if eei <= target else feasible
        best.append(feasible)
    return curve, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--target", default="B")
    ap.add_argument("--samplers", default="nsga2,tpe,random")
    ap.add_argument("--no-constraints", action="store_true", help="do not pass the target class to the samplers")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bound = target_bound(load_scheme("relative-eu"), args.target)
    space, pool = SpaceSpec(), Pool()
    names = args.samplers.split(",")
    if "random" not in names:
        names.append("random")
    curves: dict[str, list[list[float]]] = {}
    bests: dict[str, list[list[float]]] = {}
    for name in names:
        t0 = time.perf_counter()
        runs = [run(name, seed, args.trials, bound, not args.no_constraints, space, pool)
                for seed in range(args.seeds)]
        curves[name], bests[name] = [r[0] for r in runs], [r[1] for r in runs]
        print(f"# {name}: {args.seeds} seeds x {args.trials} trials in {time.perf_counter() - t0:.1f} s")
    goal = 0.95 * statistics.mean(c[-1] for c in curves["random"])
    checkpoints = [n for n in CHECKPOINTS if n <= args.trials]
    print(f"\nsurrogate pool (not measurements): default space, {NUM_LAYERS} layers, target {args.target} "
          f"(EEI <= {bound:g}) {'NOT given to the samplers' if args.no_constraints else 'as constraint'}; reference point acc {REF[0]:.3f}, EEI {REF[1]:g}; "
          f"{len(pool.cache)} distinct variants evaluated")
    print(f"hypervolume, mean (sd) over {args.seeds} seeds")
    print(f"{'sampler':<8} " + " ".join(f"{'n=' + str(n):>14}" for n in checkpoints)
          + f"  trials to 95% of random@{args.trials} [per seed]")
    for name in names:
        cells = []
        for n in checkpoints:
            vals = [c[n - 1] for c in curves[name]]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):8.3f} ({sd:.2f})")
        hits = [next((i + 1 for i, v in enumerate(c) if v >= goal), None) for c in curves[name]]
        med = statistics.median([h if h is not None else math.inf for h in hits])
        label = f"median {med:.0f}" if math.isfinite(med) else f"median >{args.trials}"
        per_seed = ",".join(str(h) if h is not None else "-" for h in hits)
        print(f"{name:<8} " + " ".join(f"{c:>14}" for c in cells) + f" {label:>15} [{per_seed}]")
    print(f"\n95% goal = {goal:.3f} (units: accuracy x EEI points)")
    print(f"\nbest mean accuracy within class {args.target} (the selection objective; baseline "
          f"{statistics.mean(BASE_ACCURACY.values()):.3f}), mean over seeds")
    print(f"{'sampler':<8} " + " ".join(f"{'n=' + str(n):>8}" for n in checkpoints))
    for name in names:
        print(f"{name:<8} " + " ".join(f"{statistics.mean(b[n - 1] for b in bests[name]):8.4f}" for n in checkpoints))


if __name__ == "__main__":
    main()
