"""greenopt's pick against every single-technique baseline, side by side in one run (issue 6).

One process, one machine, one protocol, one baseline model in memory:

  1. energy: the uncompressed model (against a copy of itself: the noise floor) and each
     baseline a user would apply by hand, each against the same baseline in A B A B order;
  2. search: greenopt search for the best class any baseline reaches (other reached classes
     are selected from the same study), with the stated budget;
  3. energy of each search pick, against the same baseline;
  4. accuracy of every point on the same seeded subset (``--items`` per task, >= 500 for the
     published figures) with standard errors.

Writes ``OUT/points.json``, ``OUT/table.md`` and ``OUT/scatter.png`` (default OUT:
docs/bench) and prints the table and a verdict line per target class. Weight-only
quantized baselines are scored on their dequantized twin (same weights, dense fp32 layers,
checked logit-for-logit against the real modules) because their CPU kernels are 2-4x slower;
the energy figures are always the real modules'. ``--resume`` reuses finished points of an
interrupted run with the same settings (their ``measured`` stamp shows it).

    python scripts/bench_baselines.py --threads 2                      # the docs run (~100 min)
    python scripts/bench_baselines.py --protocol smoke --items 5 --budget 3 --search-items 5 \\
        --only nf4,depth --out /tmp/bench                               # a 5-minute look
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import warnings

import torch
from benchlib import (
    DequantizedTwin,
    Point,
    group_near,
    mean_accuracy,
    plot_png,
    twinnable,
    verdict,
)

from greenopt import __version__
from greenopt.config import (
    CalibSpec,
    DepthStep,
    EvalSpec,
    FidelitySpec,
    MoefyStep,
    PruneStep,
    QuantizeStep,
    SearchSpec,
    SpaceSpec,
    Variant,
    protocol_preset,
)
from greenopt.evaluate import evaluate, validate_tasks
from greenopt.label import goal, grade_comparison, load_scheme
from greenopt.measure.select import select_meter
from greenopt.measure.workload import compare, load_prompts
from greenopt.models import load_model

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "lambada_openai")
TWIN_MIN_AGREE = 0.995  # top-1 agreement of twin vs real logits needed to score on the twin


def baselines(num_layers: int, in_features: list[int]) -> dict[str, Variant]:
    """Each technique as a user would apply it by hand (issue 6's list), keyed by short name."""
    gptq_g = group_near(128, in_features)
    drop = int(num_layers * 0.25 + 0.5)
    return {
        "bnb-int8": Variant(name="bnb LLM.int8 (t=6)", steps=[QuantizeStep(method="bnb_int8", bits=8,
                                                                           group_size=None, threshold=6.0)]),
        "nf4": Variant(name="bnb NF4", steps=[QuantizeStep(method="bnb_nf4", bits=4, group_size=64)]),
        "gptq4": Variant(name=f"GPTQ 4b g{gptq_g}", steps=[QuantizeStep(method="gptq", bits=4,
                                                                        group_size=gptq_g)]),
        "hqq4": Variant(name="HQQ 4b g64", steps=[QuantizeStep(method="hqq", bits=4, group_size=64)]),
        "torchao-int8": Variant(name="torchao int8 wo", steps=[QuantizeStep(method="torchao_int8", bits=8,
                                                                            group_size=None)]),
        "wanda50": Variant(name="Wanda 50%", steps=[PruneStep(method="wanda", sparsity=0.5)]),
        "2:4": Variant(name="Wanda 2:4", steps=[PruneStep(method="wanda", pattern="2:4")]),
        "depth": Variant(name=f"depth -{drop} (25%)", steps=[DepthStep(drop=drop)]),
        "moefy": Variant(name="MoEfy 8 experts top-2", steps=[MoefyStep(experts=8, top_k=2)]),
    }


def search_space() -> SpaceSpec:
    """The CPU search space: the moves that cut work on dense CPU kernels (docs/MOVES.md, docs/BENCHMARKS.md):
    fewer layers, narrower FFNs, MoE-style FFN sparsity, and per-row int8 weights (torchao;
    lossless, EEI 88-107 over eight comparisons: maybe a small saving). Pruning to sparse
    weights saves nothing on dense kernels and 4-bit paths cost 1.6-3.6x here: left out."""
    return SpaceSpec(bits=(16, 8), methods=("torchao_int8",), group_size=None, prune=(), depth_drop_max=0.5,
                     ffn_keep_min=0.375, keep_step=0.125, moefy_experts=(8,), moefy_top_k=(2, 4))


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")  # once per call on CPU LLM.int8
    tasks = validate_tasks(args.tasks.split(","))
    protocol, scheme = protocol_preset(args.protocol), load_scheme("relative-eu")
    meter = select_meter(args.meter, device="cpu")
    os.makedirs(args.out, exist_ok=True)
    store = _Store(os.path.join(args.out, "points.json"), _settings(args, protocol.id, tasks),
                   args.resume or args.repeat_energy)
    if args.repeat_energy and not store.points():
        sys.exit(f"--repeat-energy: no finished run with these settings in {args.out}; run without it first")
    t_run = time.monotonic()
    base, tok, info = load_model(args.model)
    log = lambda msg: print(f"[{(time.monotonic() - t_run) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.repeat_energy:
        _repeat(store, base, tok, protocol, meter, scheme, log, args.repeat_only)
        _report(args, store, scheme, info, protocol, meter, tasks, _front(args), time.monotonic() - t_run)
        return 0
    layers = base.model.layers
    widths = sorted({m.in_features for m in base.modules() if isinstance(m, torch.nn.Linear)})
    todo = baselines(len(layers), widths)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    live: dict[str, torch.nn.Module] = {}

    # 1. energy of the uncompressed model (against its own copy) and of each baseline
    live["uncompressed"] = copy.deepcopy(base)
    _energy(store, "uncompressed", "uncompressed", Variant(name="uncompressed (fp32)"), base, live, tok,
            protocol, meter, scheme, log)
    for key, variant in todo.items():
        _energy(store, key, "baseline", variant, base, live, tok, protocol, meter, scheme, log)

    # 2-3. greenopt search for the classes the baselines reach, then its picks' energy
    front: list[tuple[float, float]] = []
    reached = _reached(store, scheme)
    log(f"classes reached by a baseline: {', '.join(reached) or 'none'}")
    if reached and args.budget > 0:
        picks, front = _search(args, reached, base, tok, meter, scheme, tasks, log)
        for letter, variant in picks.items():
            if variant is None:
                store.put(Point(name=f"greenopt -> {letter}", kind="greenopt", target=letter, variant_hash="-",
                                eei=math.nan, eei_ci=(math.nan, math.nan),
                                error=f"no trial reached {letter} within {args.budget} trials"), f"greenopt-{letter}")
                continue
            _energy(store, f"greenopt-{letter}", "greenopt", variant, base, live, tok, protocol, meter, scheme,
                    log, target=letter)

    # 4. accuracy of every point, same items
    spec = EvalSpec(tasks=tasks, limit=args.items, seed=args.seed, batch_size=args.batch_size)
    check_ids = load_prompts(tok, protocol_preset("quick"))[:4]
    for key, model in live.items():
        _accuracy(store, key, model, tok, spec, check_ids, log)
        live[key] = None  # free as we go
        gc.collect()

    _report(args, store, scheme, info, protocol, meter, tasks, front, time.monotonic() - t_run)
    return 0


# ---------------------------------------------------------------------------- phases


def _energy(store, key, kind, variant, base, live, tok, protocol, meter, scheme, log, target=None) -> None:
    from greenopt.compress import apply
    from greenopt.compress.accounting import weight_bytes
    from greenopt.search.pareto import describe

    t0 = time.monotonic()
    cand = live.get(key)
    report, apply_s = None, 0.0
    if cand is None:
        cand = copy.deepcopy(base)
        try:
            report = apply(cand, variant, tokenizer=tok)
        except Exception as e:  # a technique that fails on this machine is a row, not a crash
            store.put(Point(name=variant.name or key, kind=kind, target=target, variant_hash=variant.hash,
                            steps=describe(variant), eei=math.nan, eei_ci=(math.nan, math.nan),
                            error=f"{type(e).__name__}: {str(e)[:160]}"), key, variant)
            log(f"{key}: FAILED to apply: {e}")
            return
        apply_s = time.monotonic() - t0
    live[key] = cand
    if store.done(key, "energy"):
        log(f"{key}: energy reused from the interrupted run")
        return
    cmp = compare(base, cand, tok, protocol, meter)
    g = grade_comparison(cmp, scheme)
    c = cmp.candidate
    store.put(Point(
        name=variant.name or key, kind=kind, target=target, variant_hash=variant.hash, steps=describe(variant),
        eei=cmp.eei, eei_ci=cmp.eei_ci, joules_per_token=c.joules_per_token,
        joules_per_token_ci=c.joules_per_token_ci, tier=cmp.tier, device=c.device.name, protocol_id=c.protocol_id,
        display=g.display, worst_letter=g.worst_letter, tokens_per_s=c.tokens_per_s,
        tokens_per_s_ratio=c.tokens_per_s / cmp.baseline.tokens_per_s,
        weight_bytes=report.weight_bytes_after if report else weight_bytes(cand),
        fast_kernel=report.fast_kernel if report else None, flags=tuple(c.flags), apply_s=apply_s), key, variant)
    log(f"{key}: EEI {cmp.eei:.1f} [{cmp.eei_ci[0]:.1f}-{cmp.eei_ci[1]:.1f}] {g.display} "
        f"({time.monotonic() - t0:.0f} s)")


def _repeat(store, base, tok, protocol, meter, scheme, log, only: str | None = None) -> None:
    """Re-measures every point's energy in this (new) process: the re-run check of the docs."""
    from greenopt.compress import apply

    for key in store.keys():
        if only and key not in only.split(","):
            continue
        p = store.get(key)
        if p.error:
            continue
        t0 = time.monotonic()
        variant = Variant.model_validate(store.variant(key))
        cand = copy.deepcopy(base)
        if variant.steps:
            apply(cand, variant, tokenizer=tok)
        cmp = compare(base, cand, tok, protocol, meter)
        g = grade_comparison(cmp, scheme)
        store.put_repeat(key, {"eei": cmp.eei, "eei_ci": list(cmp.eei_ci), "display": g.display,
                               "worst_letter": g.worst_letter, "tier": cmp.tier})
        log(f"{key}: re-run EEI {cmp.eei:.1f} [{cmp.eei_ci[0]:.1f}-{cmp.eei_ci[1]:.1f}] {g.display} "
            f"(first run {p.eei:.1f}; {time.monotonic() - t0:.0f} s)")
        del cand
        gc.collect()


def _front(args) -> list[tuple[float, float]]:
    path = os.path.join(args.out, "front.json")
    return [tuple(x) for x in json.load(open(path))] if os.path.exists(path) else []


def _reached(store, scheme) -> list[str]:
    """Letters reached (worse end of the interval) by some baseline, better than uncompressed's."""
    order = [c.letter for c in scheme.classes]
    ref = store.get("uncompressed")
    worst_ok = order.index(ref.worst_letter) if ref and ref.worst_letter else len(order)
    got = {p.worst_letter for p in store.points() if p.kind == "baseline" and p.worst_letter and not p.error}
    return sorted((x for x in got if order.index(x) < worst_ok), key=order.index)


def _search(args, reached, base, tok, meter, scheme, tasks, log):
    """One search aimed at the best reached class; every reached class selected from its trials."""
    from greenopt.search import pareto, records, search
    from greenopt.search.runner import TransformersRunner
    from greenopt.search.storage import open_study

    spec = SearchSpec(
        model=args.model, target=reached[0], n_trials=args.budget, seed=args.seed, sampler="tpe",
        space=search_space(), calib=CalibSpec(samples=16, seq_len=128, seed=0),
        fidelity=FidelitySpec(perplexity_cut=20.0, energy_cut=None, protocol=args.protocol,
                              eval=EvalSpec(tasks=tasks, limit=args.search_items, seed=args.seed + 1)),
        meter=args.meter, device="cpu", name=f"bench-{reached[0]}", runs_dir=os.path.join(args.out, "runs"))
    log(f"search: target {reached[0]}, {args.budget} trials, {args.search_items} items/task per full eval")
    runner = TransformersRunner(spec, model=copy.deepcopy(base), tokenizer=tok, meter=meter)
    result = search(spec, runner=runner, resume=args.resume, force=not args.resume)
    study = open_study(spec, result.storage, create=False)
    recs = records(study)
    picks = {}
    for letter in reached:
        r = pareto.select(recs, goal(scheme, letter))
        picks[letter] = None if r is None else r.variant.model_copy(
            update={"name": f"greenopt -> {letter} (trial {r.number})"})
        log(f"search pick for {letter}: {'none' if r is None else pareto.describe(r.variant)}")
    front = [(r.eei, r.mean_accuracy) for r in result.front]
    _write(os.path.join(args.out, "front.json"), json.dumps(front) + "\n")
    return picks, front


def _accuracy(store, key, model, tok, spec, check_ids, log) -> None:
    p = store.get(key)
    if p is None or p.error or store.done(key, "accuracy"):
        return
    t0 = time.monotonic()
    variant = Variant.model_validate(store.variant(key))
    scored_on = "model"
    if twinnable(variant):
        with DequantizedTwin(model, check_ids) as twin:
            a = twin.agreement
            scored_on = (f"dequantized twin ({twin.swapped} layers; top-1 agree {a['top1_agree']:.4f}, "
                         f"max abs logit diff {a['max_abs_diff']:.2g}, logit std {a['logit_std']:.2g})")
            if a["top1_agree"] >= TWIN_MIN_AGREE:
                res = evaluate(model, tok, spec)
            else:
                scored_on, res = None, None
        if res is None:
            scored_on = "model (twin check failed)"
            res = evaluate(model, tok, spec)
    else:
        res = evaluate(model, tok, spec)
    acc, se = mean_accuracy(res.scores)
    store.put(p.model_copy(update={"accuracy": acc, "accuracy_se": se, "scores": res.scores,
                                   "scored_on": scored_on}), key)
    log(f"{key}: accuracy {acc:.4f} ± {se:.4f} on {scored_on} ({time.monotonic() - t0:.0f} s)")


# ---------------------------------------------------------------------------- output


def _report(args, store, scheme, info, protocol, meter, tasks, front, wall_s) -> None:
    pts = store.points()
    reps = [store.repeat(k) for k in store.keys()]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"Model {info.model_id}; {platform.processor() or platform.machine()}, {args.threads} threads; "
            f"protocol {protocol.id}; meter {meter.name} (tier {meter.tier}); torch {torch.__version__}; "
            f"greenopt {__version__}; tasks {', '.join(tasks)} at {args.items} seeded items each "
            f"(seed {args.seed}); search budget {args.budget} trials; {when}; "
            f"{'the re-run' if args.repeat_energy else 'the run'} took {wall_s / 60:.1f} min.")
    rows = ["| point | steps | EEI [95%] | class | re-run EEI [95%] (class) | J/token [95%] (tier) | "
            "tokens/s (x base) | weight MB | mean acc ± SE | " + " | ".join(tasks) + " | scored on |",
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    agree, n_rep = 0, 0
    for p, rep in zip(pts, reps):
        if p.error:
            rows.append(f"| {p.name} | {p.steps} | failed: {p.error} |" + " |" * (8 + len(tasks)))
            continue
        again = "-"
        if rep:
            again = f"{rep['eei']:.1f} [{rep['eei_ci'][0]:.1f}-{rep['eei_ci'][1]:.1f}] ({rep['display']})"
            n_rep += 1
            agree += p.eei_ci[0] <= rep["eei"] <= p.eei_ci[1]
        per = {s.task: s for s in p.scores}
        accs = " | ".join(f"{per[t].value:.3f}" if t in per else "-" for t in tasks)
        jpt = (f"{p.joules_per_token:.3g} [{p.joules_per_token_ci[0]:.3g}-{p.joules_per_token_ci[1]:.3g}] ({p.tier})"
               if p.joules_per_token else "-")
        acc = f"{p.accuracy:.4f} ± {p.accuracy_se:.4f}" if p.accuracy is not None else "-"
        rows.append(f"| {p.name} | {p.steps or '-'} | {p.eei:.1f} [{p.eei_ci[0]:.1f}-{p.eei_ci[1]:.1f}] | "
                    f"{p.display} | {again} | {jpt} | {p.tokens_per_s:.1f} (x{p.tokens_per_s_ratio:.2f}) | "
                    f"{(p.weight_bytes or 0) / 1e6:.1f} | {acc} | {accs} | {p.scored_on.replace('|', '/')} |")
    lines = [head, "", *rows, ""]
    if n_rep:
        lines += [f"Re-run (a new process, every point re-applied and re-measured against the same baseline): "
                  f"{agree} of {n_rep} re-run EEIs fall inside the first run's 95% interval.", ""]
    base_pts = [p for p in pts if p.kind in ("baseline", "uncompressed")]
    for p in pts:
        if p.kind != "greenopt":
            continue
        if p.error or p.accuracy is None:
            lines.append(f"**Target {p.target}**: greenopt found no variant ({p.error}).")
            continue
        same = [b for b in base_pts if b.worst_letter and _better_or_equal(scheme, b.worst_letter, p.target)]
        lines.append(f"**Target {p.target}**: greenopt's pick {p.steps} (EEI {p.eei:.1f}, {p.display}, acc "
                     f"{p.accuracy:.4f}); baselines that reach {p.target}: "
                     f"{', '.join(b.name for b in same) or 'none'}. Against every point:")
        lines += verdict(p, base_pts)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    _write(os.path.join(args.out, "table.md"), text + "\n")
    # The search front is not drawn: its accuracies come from the search's smaller item subset,
    # not comparable with the points' (front.json keeps it).
    plot_png(pts, scheme, os.path.join(args.out, "scatter.png"),
             title=f"{info.model_id}, {protocol.id}, tier {meter.tier}, {args.items} items x {len(tasks)} tasks")


def _better_or_equal(scheme, letter: str, target: str) -> bool:
    order = [c.letter for c in scheme.classes]
    return order.index(letter) <= order.index(target)


def _write(path: str, text: str) -> None:
    from pathlib import Path

    from greenopt._io import write_text

    write_text(Path(path), text)


class _Store:
    """points.json, rewritten atomically after every measurement; ``resume`` keeps a matching run's."""

    def __init__(self, path: str, settings: dict, resume: bool) -> None:
        self.path, self.settings = path, settings
        self._pts: dict[str, dict] = {}
        if resume and os.path.exists(path):
            old = json.load(open(path))
            if old.get("settings") == settings:
                self._pts = old["points"]
            else:
                print("--resume: settings differ from the stored run; starting over", file=sys.stderr)

    def put(self, point: Point, key: str, variant: Variant | None = None) -> None:
        entry = self._pts.setdefault(key, {})
        entry["point"] = point.model_dump(mode="json")
        if variant is not None:
            entry["variant"] = variant.model_dump(mode="json")
        entry["measured"] = _now()
        _write(self.path, json.dumps({"settings": self.settings, "points": self._pts}, indent=1) + "\n")

    def get(self, key: str) -> Point | None:
        e = self._pts.get(key)
        return Point.model_validate(e["point"]) if e else None

    def done(self, key: str, stage: str) -> bool:
        p = self.get(key)
        return p is not None and not p.error and (p.accuracy is not None if stage == "accuracy" else True)

    def put_repeat(self, key: str, figures: dict) -> None:
        self._pts[key]["repeat"] = {**figures, "measured": _now()}
        _write(self.path, json.dumps({"settings": self.settings, "points": self._pts}, indent=1) + "\n")

    def repeat(self, key: str) -> dict | None:
        return self._pts[key].get("repeat")

    def keys(self) -> list[str]:
        return list(self._pts)

    def variant(self, key: str) -> dict:
        return self._pts[key]["variant"]

    def points(self) -> list[Point]:
        return [Point.model_validate(e["point"]) for e in self._pts.values()]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _settings(args, protocol_id: str, tasks) -> dict:
    return {"model": args.model, "protocol": protocol_id, "tasks": list(tasks), "items": args.items,
            "seed": args.seed, "budget": args.budget, "search_items": args.search_items, "threads": args.threads,
            "only": args.only}


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--protocol", default="cpu", help="energy protocol preset (default: cpu)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma list of offline tasks (default: all five)")
    ap.add_argument("--items", type=int, default=500, help="seeded items per task for every point (default: 500)")
    ap.add_argument("--budget", type=int, default=16, help="search trials incl. the baseline (0: no search)")
    ap.add_argument("--search-items", type=int, default=50, help="items per task in the search's full eval")
    ap.add_argument("--only", help="comma list of baselines: bnb-int8,nf4,gptq4,hqq4,torchao-int8,wanda50,2:4,"
                                   "depth,moefy")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--meter", default="auto")
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--resume", action="store_true", help="reuse finished points of a run with the same settings")
    ap.add_argument("--repeat-energy", action="store_true",
                    help="re-measure the energy of every point of a finished run in this new process (re-run check)")
    ap.add_argument("--repeat-only", help="with --repeat-energy: comma list of point keys (e.g. uncompressed,depth)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
