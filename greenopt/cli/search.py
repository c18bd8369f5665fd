"""``greenopt search`` and ``greenopt worker``."""

from __future__ import annotations

import argparse
import sys

from greenopt.cli.common import (
    add_include_path,
    check_writable,
    console,
    emit_json,
    out,
    progress_bars,
    thread_count,
    whole,
)
from greenopt.config import SearchSpec, validated
from greenopt.config.recipe import load_recipe
from greenopt.config.search import MAX_TRIALS
from greenopt.errors import ConfigError
from greenopt.evaluate import validate_tasks
from greenopt.report.plot import render_front
from greenopt.search import search, to_json, worker

EPILOG_SEARCH = """examples:
  greenopt search --model default --target A                    # default space, 20 trials
  greenopt search --model default --target B --max-drop 0.02 --budget 40 --sampler nsga2
  greenopt search recipes/cpu-demo.yaml                          # everything from a recipe
  greenopt search --model default --target A --name demo --resume   # continue a stopped run
  greenopt search --model ./ckpt --target B --storage postgresql://u:p@host/db --name shared
  greenopt worker --storage postgresql://u:p@host/db --study shared  # on each extra machine
"""


def add_parsers(sub) -> None:
    """Adds search and worker to the parser tree."""
    p = sub.add_parser("search", help="find the most accurate variant that reaches a label",
                       epilog=EPILOG_SEARCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="a recipe YAML with a search section (flags below override it)")
    p.add_argument("--model", help="'default', a transformers folder, or a hub id (default: default)")
    p.add_argument("--target", help="label class to reach, e.g. A (default: A)")
    p.add_argument("--scheme", help="label scheme name or file (default: relative-eu)")
    p.add_argument("--max-drop", type=float, help="largest allowed mean-accuracy loss, a fraction (0.02 = 2 points)")
    p.add_argument("--budget", type=whole(1, MAX_TRIALS), help="number of trials, the baseline included (default: 20)")
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument("--sampler", choices=("tpe", "nsga2", "random"), help="Optuna sampler (default: tpe)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="do not start with each move of the space alone (default: warm start on)")
    p.add_argument("--seed", type=int, help="sampler and subset seed (default: 0)")
    p.add_argument("--tasks", nargs="+", help="accuracy tasks for the full fidelity (default: arc_easy piqa)")
    p.add_argument("--limit", type=whole(0, note=" (0 = full sets)"),
                   help="items per task in the full fidelity (default: 100; 0 = full sets)")
    add_include_path(p)
    p.add_argument("--protocol", help="energy protocol preset for the full fidelity (default: cpu)")
    p.add_argument("--bits", type=int, nargs="+", help="bit widths the space may use, e.g. 16 8 4")
    p.add_argument("--methods", nargs="+", help="quantization backends, e.g. hqq rtn bnb_nf4")
    p.add_argument("--no-prune", action="store_true", help="leave pruning out of the space")
    p.add_argument("--depth-max", type=float, help="largest fraction of layers the space may drop")
    p.add_argument("--ffn-keep-min", type=float, help="smallest FFN width fraction the space may keep")
    p.add_argument("--moefy", type=int, nargs="*", help="expert counts for MoE-style sparsification, e.g. 8")
    p.add_argument("--meter", help="auto, nvml, rapl or estimate (default: auto)")
    p.add_argument("--cpu-watts", type=float, help="watts per busy core for the estimate meter")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads")
    p.add_argument("--name", help="run name: results go to runs/NAME (default: MODEL-TARGET)")
    p.add_argument("--runs-dir", help="parent folder of run folders (default: runs)")
    p.add_argument("--storage", help="Optuna RDB URL to share the study between workers")
    p.add_argument("--resume", action="store_true", help="continue the run in runs/NAME")
    p.add_argument("--force", action="store_true", help="start runs/NAME over (or resume a changed spec)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("worker", help="run trials of a shared study (Optuna RDB storage)",
                       epilog=EPILOG_SEARCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", required=True, help="the RDB URL given to greenopt search --storage")
    p.add_argument("--study", required=True, help="the study name (the search's --name)")
    p.add_argument("--trials", type=whole(1, MAX_TRIALS), help="at most this many trials from this worker")
    p.add_argument("--device", help="this worker's device, e.g. cuda:1")
    p.add_argument("--runs-dir", help="where this worker writes trial records")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the trial records as JSON")



def _spec_from_args(args):
    base: dict = {}
    if args.recipe:

        recipe = load_recipe(args.recipe)
        if getattr(recipe, "search", None) is None:

            raise ConfigError(f"{args.recipe}: has no search section; use `greenopt apply {args.recipe}` "
                              "for a pinned variant")
        base = recipe.search_spec().model_dump()
    data = dict(base)
    for key, val in (("model", args.model), ("target", args.target), ("scheme", args.scheme),
                     ("max_drop", args.max_drop), ("n_trials", args.budget), ("timeout_s", args.timeout),
                     ("sampler", args.sampler), ("seed", args.seed), ("meter", args.meter),
                     ("cpu_watts", args.cpu_watts), ("device", args.device), ("threads", args.threads),
                     ("name", args.name),
                     ("runs_dir", args.runs_dir), ("storage", args.storage)):
        if val is not None:
            data[key] = val
    if args.no_warm_start:
        data["warm_start"] = False
    space = dict(data.get("space", {}))
    if args.bits:
        space["bits"] = tuple(args.bits)
    if args.methods:
        space["methods"] = tuple(args.methods)
    if args.no_prune:
        space["prune"] = ()
    if args.depth_max is not None:
        space["depth_drop_max"] = args.depth_max
    if args.ffn_keep_min is not None:
        space["ffn_keep_min"] = args.ffn_keep_min
    if args.moefy is not None:
        space["moefy_experts"] = tuple(args.moefy)
    fidelity = dict(data.get("fidelity", {}))
    if args.protocol:
        fidelity["protocol"] = args.protocol
    if args.tasks or args.limit is not None or args.include_path:
        ev = dict(fidelity.get("eval", {}))
        if args.tasks:
            ev["tasks"] = tuple(args.tasks)
        if args.limit is not None:
            ev["limit"] = args.limit or None  # 0: full sets, as for greenopt measure
        if args.include_path:
            ev["include_path"] = args.include_path
        fidelity["eval"] = ev
    data["space"], data["fidelity"] = space, fidelity
    return validated(SearchSpec, data, where="search")


def _live(console):
    def on_trial(rec, best) -> None:
        what = rec.grade.display if rec.grade is not None else rec.state.lower()
        acc = f"acc {rec.mean_accuracy:.3f}" if rec.mean_accuracy is not None else ""
        e = f"{rec.energy:.1f}" if rec.energy is not None else "-"
        line = f"trial {rec.number}: {rec.state} {what} energy {e} {acc}"
        if rec.reason:
            line += f" ({rec.reason})"
        if best is not None:
            line += f" | best feasible: trial {best.number} {best.grade.display if best.grade else ''}"
        console.print(line)
    return on_trial


def cmd_search(args) -> int:
    spec = _spec_from_args(args)
    check_writable(spec.runs_dir, "--runs-dir")  # before the model loads
    validate_tasks(spec.fidelity.eval.tasks, spec.fidelity.eval.include_path)  # before the model loads
    with progress_bars(not args.json) as progress:
        result = search(spec, progress=progress, on_trial=None if args.json else _live(console),
                        resume=args.resume, force=args.force)
    if args.json:
        emit_json(to_json(result))
    else:
        out.print(render_front(result))
        render_outcome(result, out)
    return 130 if result.interrupted else 0  # Ctrl-C: the run is not finished (continue with --resume)


def render_outcome(result, console) -> None:
    """The chosen variant, or the honest unreachable report, plus where the files are."""
    counts = ", ".join(f"{v} {k.lower()}" for k, v in result.counts.items() if v)
    ran = sum(result.counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL"))
    console.print(f"{ran} of {result.n_trials} trials ran ({counts or 'none'}) in {result.duration_s / 60:.1f} "
                  f"min; run folder {result.run_dir}")
    stop = getattr(result, "stop_reason", None)  # why the loop stopped (budget, time limit, Ctrl-C, failures)
    if stop:
        console.print(f"stopped: {stop}")
    if result.estimated:
        console.print("[yellow]energy figures are E1 estimates (no hardware counter here): classes are "
                      "shown as ~X (estimated), never as plain letters[/yellow]")
    confirmed = [r for r in result.trials if r.confirmed]
    if confirmed:
        console.print(f"confirmed {len(confirmed)} trials with fresh repeated comparisons in "
                      f"{result.confirm_s / 60:.1f} min: " + "; ".join(
                          f"trial {r.number} {r.display} (search read {r.search_display})" for r in confirmed))
    if result.finalists:
        items = "the full task sets" if result.finalists[0].limit is None else f"{result.finalists[0].limit} items a task"
        console.print(f"finalists scored on {items} in {result.final_s / 60:.1f} min, the pick against each "
                      "(paired on the same items; |z| < 2 is within noise):")
        for t in result.finalists:
            console.print(f"  {t.line}")
    if result.chosen is not None:
        c = result.chosen
        how = ("interval over repeated comparisons" if c.confirmed
               else "in-run interval from the search's one comparison")
        console.print(f"[bold green]chosen[/bold green]: trial {c.number} {c.steps} -> class {c.display}, "
                      f"EEI {c.eei:.1f} [{c.eei_ci[0]:.1f}, {c.eei_ci[1]:.1f}] ({how}), mean accuracy "
                      f"{c.mean_accuracy:.3f}")
        console.print(f"variant file: {result.chosen_path}")
        console.print(f"export it: {result.export_command}")
    elif result.unreachable is not None:
        u = result.unreachable
        console.print(f"[bold red]target {result.target} not reached[/bold red]: {u.message}")
        for r in u.closest:
            drop = f", accuracy drop {r.accuracy_drop:.3f}" if r.accuracy_drop is not None else ""
            console.print(f"  closest: trial {r.number} ({r.variant_hash}) {r.display}, energy {r.energy:.1f} "
                          f"(worse end {r.energy_worst:.1f}){drop}; limited by {r.limited_by}")
    if result.interrupted:
        console.print("interrupted: continue with the same command and --resume")
    for kind, path in result.plots.items():
        console.print(f"plot ({kind}): {path}")


def cmd_worker(args) -> int:
    if args.runs_dir:
        check_writable(args.runs_dir, "--runs-dir")
    try:
        with progress_bars(not args.json) as progress:
            done = worker(args.storage, args.study, args.trials, device=args.device, runs_dir=args.runs_dir,
                          threads=args.threads, progress=progress, on_trial=None if args.json else _live(console))
    except KeyboardInterrupt:
        print("greenopt: interrupted; the trial in flight is recorded as failed; start the worker again to "
              "continue the study", file=sys.stderr)
        return 130
    if args.json:
        emit_json([r.model_dump(mode="json") for r in done])
    else:
        console.print(f"worker ran {len(done)} trials of study {args.study}")
    return 0


HANDLERS = {"search": cmd_search, "worker": cmd_worker}

