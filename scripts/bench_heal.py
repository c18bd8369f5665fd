"""Does healing pay? Depth -8 and FFN width 50%, each without and with a heal step (issue 12).

For each cut, on the default model, in one process: KL to the baseline on held-out
calibration windows (the heal step's own held-out slice, read from its report), accuracy on ARC-Easy and PIQA
over the same seeded items as the baseline (the difference is taken item set against item
set; its standard error treats the two scores as independent, which overstates it: the
per-item pairing is not exposed by ``evaluate``), and accuracy points recovered per minute
of healing (wall time of the heal step: windows, KL before, training, KL after). The cut
model is scored, then healed in place with the baseline as teacher (the model that applying
the cut and the heal step in one variant gives, without cutting twice).

    python scripts/bench_heal.py --limit 200 --steps 100 --max-seconds 600
    python scripts/bench_heal.py --limit 50 --steps 20 --max-seconds 240 --seq-len 128   # modest
    python scripts/bench_heal.py --modes full,lora --rank 8 --lora-lr 1e-3   # full fine-tuning vs LoRA
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import platform
import re
import sys
import time

import torch

from greenopt._io import write_json
from greenopt.compress import ApplyContext, apply, handler
from greenopt.config import DepthStep, EvalSpec, HealStep, Variant, WidthStep
from greenopt.env import cpu_flags
from greenopt.evaluate import evaluate
from greenopt.models import load_model
from greenopt.records import StepReport

CUTS = {"depth -8": DepthStep(drop=8), "width ffn 50%": WidthStep(ffn_keep=0.5)}
TASKS = ("arc_easy", "piqa")


def _scores(result) -> dict[str, tuple[float, float]]:
    return {s.task: (s.value, s.stderr or 0.0) for s in result.scores}


def _vs_base(acc: dict, base: dict) -> dict[str, dict[str, float]]:
    out = {}
    for task, (v, se) in acc.items():
        b, bse = base[task]
        out[task] = {"acc": v, "stderr": se, "diff": v - b, "diff_stderr": math.hypot(se, bse)}
    return out


def _mean_diff(rows: dict) -> float:
    return sum(r["diff"] for r in rows.values()) / len(rows)


def _heal_in_place(cand, base, tok, cut, step: HealStep) -> tuple[float, StepReport]:
    """Heals the already cut ``cand`` with ``base`` as the teacher: the same model as applying
    ``Variant(steps=(cut, step))`` to the baseline, without cutting it twice."""
    ctx = ApplyContext(tokenizer=tok, earlier=(cut.kind,), teacher=base)
    t0 = time.perf_counter()
    rep = handler("heal").apply(cand, step, ctx)
    return time.perf_counter() - t0, rep


def _kl_of(rep: StepReport) -> tuple[float, float]:
    m = re.search(r"KL ([0-9.]+) -> ([0-9.]+) nats/token", rep.summary)
    if m is None:
        raise RuntimeError(f"no KL figures in the heal report: {rep.summary!r}")
    return float(m.group(1)), float(m.group(2))


def _cut(base, tok, name: str, cut, steps: list[HealStep], spec: EvalSpec, base_acc: dict) -> list[dict]:
    """The cut once, then each heal step (mode) on its own copy of the cut model."""
    cut_model = copy.deepcopy(base)
    t0 = time.perf_counter()
    report = apply(cut_model, Variant(steps=(cut,)), tokenizer=tok)
    cut_s = time.perf_counter() - t0
    plain = _vs_base(_scores(evaluate(cut_model, tok, spec)), base_acc)
    rows = []
    for step in steps:
        cand = copy.deepcopy(cut_model)
        heal_s, rep = _heal_in_place(cand, base, tok, cut, step)
        healed = _vs_base(_scores(evaluate(cand, tok, spec)), base_acc)
        kl_before, kl_after = _kl_of(rep)
        recovered = _mean_diff(healed) - _mean_diff(plain)
        del cand
        gc.collect()
        rows.append({"cut": name, "mode": step.mode, "rank": step.rank if step.mode == "lora" else None,
                     "lr": step.lr, "variant_hash": Variant(steps=(cut,)).hash,
                     "healed_variant_hash": Variant(steps=(cut, step)).hash, "params_after": report.params_after,
                     "cut_apply_s": cut_s, "kl_before_nats_per_token": kl_before, "kl_after_nats_per_token": kl_after,
                     "accuracy_without_heal": plain, "accuracy_with_heal": healed, "heal_wall_s": heal_s,
                     "recovered_points": 100 * recovered,
                     "recovered_points_per_minute": 100 * recovered / (heal_s / 60), "heal_notes": list(rep.notes)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=100, help="items per task (fixed seeded subset)")
    ap.add_argument("--steps", type=int, default=100, help="heal optimizer steps")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="heal training budget per variant")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--heldout-rows", type=int, default=16, help="held-out calibration windows for the KL")
    ap.add_argument("--modes", default="full", help="comma list of heal modes, each on its own copy: full,lora")
    ap.add_argument("--rank", type=int, default=8, help="lora rank")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="lora learning rate (adapters start at zero)")
    ap.add_argument("--only", help="comma list of cuts: " + ",".join(CUTS).replace("%", "%%"))
    ap.add_argument("--json", default="docs/bench/heal.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tok, info = load_model(args.model, dtype="float32", device="cpu")
    spec = EvalSpec(tasks=TASKS, limit=args.limit)
    step = HealStep(steps=args.steps, max_seconds=args.max_seconds, batch=args.batch, seq_len=args.seq_len,
                    lr=args.lr, heldout_rows=args.heldout_rows)
    steps = [step if mode == "full" else step.model_copy(update={"mode": mode, "rank": args.rank, "lr": args.lora_lr})
             for mode in args.modes.split(",")]
    print(f"CPU flags: {' '.join(cpu_flags()) or 'none of interest'}; {args.threads} threads", file=sys.stderr)
    base_acc = _scores(evaluate(base, tok, spec))
    rows = []
    for name in (args.only.split(",") if args.only else list(CUTS)):
        rows += _cut(base, tok, name, CUTS[name], steps, spec, base_acc)
        print(f"{name}: done", file=sys.stderr, flush=True)
    result = {"model": info.model_id, "machine": platform.processor() or platform.machine(),
              "cpu_flags": list(cpu_flags()),
              "threads": args.threads, "torch": torch.__version__, "limit": args.limit, "tasks": list(TASKS),
              "heal": step.model_dump(mode="json"),
              "baseline": {t: {"acc": v, "stderr": se} for t, (v, se) in base_acc.items()}, "rows": rows}
    write_json(args.json, result)
    print(_table(result))
    return 0


def _table(result: dict) -> str:
    h = result["heal"]
    head = (f"Model {result['model']}, {result['threads']} threads; heal budget {h['steps']} steps or "
            f"{h['max_seconds']:g} s of training ({h['batch']} x {h['seq_len']} tokens a step, lr {h['lr']:g}); "
            f"{result['limit']} seeded items per task; accuracy points vs the baseline on the same items "
            "(+-1 SE, unpaired).")
    lines = [head, "",
             "| cut | heal | KL nats/token | ARC-Easy | PIQA | heal wall s | points recovered / min |",
             "|---|---|---|---|---|---|---|"]
    base = result["baseline"]
    lines.append(f"| baseline | - | 0 | {base['arc_easy']['acc']:.3f} | {base['piqa']['acc']:.3f} | - | - |")
    seen = set()
    for r in result["rows"]:
        for healed in (False, True):
            if not healed and r["cut"] in seen:
                continue  # the unhealed cut once
            seen.add(r["cut"])
            acc = r["accuracy_with_heal" if healed else "accuracy_without_heal"]
            kl = r["kl_after_nats_per_token" if healed else "kl_before_nats_per_token"]
            cells = [f"{acc[t]['acc']:.3f} ({100 * acc[t]['diff']:+.1f} +-{100 * acc[t]['diff_stderr']:.1f})"
                     for t in ("arc_easy", "piqa")]
            tail = f"{r['heal_wall_s']:.0f} | {r['recovered_points_per_minute']:+.2f}" if healed else "- | -"
            mode = r.get("mode", "full")
            how = (f"{mode} (rank {r['rank']}, lr {r['lr']:g})" if mode == "lora" else f"full (lr {r['lr']:g})") \
                if healed else "no"
            lines.append(f"| {r['cut']} | {how} | {kl:.4f} | {cells[0]} | {cells[1]} | {tail} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
