"""Runtimes and formats side by side on one machine, one protocol and one baseline (issue 11).

Every row is measured against the same baseline (transformers, the checkpoint's fp32) with R
fresh comparisons (GO-1 A B A B each; the reported interval includes the spread between them
and never reads narrower than the machine's noise floor), and scored on the same seeded items,
paired against the baseline, on the artifact that was measured (never a stand-in).

    .venv/bin/python scripts/bench_runtimes.py --limit 500 --comparisons 3 --threads 2
    .venv/bin/python scripts/bench_runtimes.py --only "transformers bf16" --limit 100   # one row, quick
    .venv/bin/python scripts/bench_runtimes.py --pick runs/demo                          # add a search's pick

Prints the CPU flags and the kernel probe first; writes docs/bench/runtimes.json. Time nothing
else meanwhile: a second busy process changes every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from greenopt.config import (
    Deploy,
    EvalSpec,
    QuantizeStep,
    Variant,
    load_variant,
    protocol_preset,
)
from greenopt.env import cpu_flags, set_threads
from greenopt.errors import GreenoptError
from greenopt.evaluate import evaluate
from greenopt.evaluate.fidelity import paired_difference
from greenopt.label import grade_comparison, load_scheme
from greenopt.measure.select import select_meter
from greenopt.measure.workload import compare_repeated
from greenopt.models import load_model
from greenopt.runtimes import TransformersRuntime, deploy, runtime_class, unrealisable
from greenopt.runtimes.probe import probe_kernels

BF16 = Deploy(dtype="bfloat16")
ROWS: tuple[tuple[str, Variant], ...] = (
    ("transformers fp32 (baseline vs itself)", Variant()),
    ("transformers bf16", Variant(deploy=BF16)),
    # static KV cache + torch.compile of the decode step; the compile runs in the (unmeasured) warm-up
    ("transformers fp32 compiled", Variant(deploy=Deploy(compile=True))),
    ("transformers bf16 compiled", Variant(deploy=Deploy(dtype="bfloat16", compile=True))),
    ("bf16 + rtn int4 g32 (fused int4 kernel)",
     Variant(steps=(QuantizeStep(method="rtn", bits=4, group_size=32),), deploy=BF16)),
    ("bf16 + hqq int4 g64 (fused int4 kernel)",
     Variant(steps=(QuantizeStep(method="hqq", bits=4, group_size=64),), deploy=BF16)),
    ("bitsandbytes NF4 (fp32 activations)", Variant(steps=(QuantizeStep(method="bnb_nf4", bits=4),))),
    ("onnxruntime-genai int4 b32 acc4", Variant(deploy=Deploy(runtime="onnxruntime-genai", weights="int4"))),
    ("onnxruntime-genai int8 b32 acc4", Variant(deploy=Deploy(runtime="onnxruntime-genai", weights="int8"))),
    # greenopt's calibrated GPTQ codes imported into MatMulNBits (runtimes.gptq_export), not the builder's RTN
    ("onnxruntime-genai int4 b32 acc4, gptq codes",
     Variant(steps=(QuantizeStep(method="gptq", bits=4, group_size=32),),
             deploy=Deploy(runtime="onnxruntime-genai", weights="int4"))),
    # greenopt[llamacpp] (make llamacpp); without it these rows say how to install it
    ("llama.cpp Q8_0", Variant(deploy=Deploy(runtime="llama.cpp", weights="q8_0"))),
    ("llama.cpp Q4_K_M", Variant(deploy=Deploy(runtime="llama.cpp", weights="q4_k_m"))),
)


def main() -> int:
    a = _args()
    set_threads(a.threads)
    print(f"machine: {platform.node()} / {platform.processor() or platform.machine()}; "
          f"CPU flags: {' '.join(cpu_flags()) or 'none of interest'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    probe = probe_kernels()
    print("kernel probe (batch 1, ratio to fp32 in the same run):")
    for line in probe.lines():
        print(f"  {line}")
    protocol = protocol_preset(a.protocol)
    meter = select_meter(a.meter, cpu_watts=a.cpu_watts, device="cpu")
    print(f"every row: protocol {protocol.id}, meter {meter.name} (tier {meter.tier}) on {meter.device().name}, "
          f"{a.comparisons} comparisons against transformers fp32")
    scheme = load_scheme("relative-eu")
    spec = EvalSpec(tasks=tuple(a.tasks), limit=a.limit or None, seed=0)
    model, tok, info = load_model("default", dtype="float32", device="cpu")
    model.eval()
    t = time.perf_counter()
    base_eval = _scored(TransformersRuntime(model, tok), tok, spec)
    print(f"baseline scored in {time.perf_counter() - t:.0f} s: "
          + ", ".join(f"{s.task} {s.value:.3f} (n {s.n})" for s in base_eval.scores))
    rows = [r for r in ROWS if not a.only or r[0] in a.only]
    if a.pick:
        rows.append((f"greenopt pick ({a.pick})", load_variant(Path(a.pick) / "chosen.yaml")))
    out = []
    for name, variant in rows:
        print(f"\n== {name}", flush=True)
        out.append(_row(name, variant, model, tok, protocol, meter, scheme, spec, base_eval, a.comparisons))
        _print(out[-1])
    doc = {"machine": platform.node(), "cpu_flags": list(cpu_flags()), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "protocol": protocol.id, "meter": meter.name, "comparisons": a.comparisons,
           "limit": a.limit, "tasks": a.tasks, "kernel_probe": probe.model_dump(mode="json"), "rows": out,
           "model": info.model_id, "command": " ".join(sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {a.out}")
    _table(out)
    return 0


def _row(name, variant, model, tok, protocol, meter, scheme, spec, base_eval, repeats) -> dict:
    reason = unrealisable(variant.deploy, variant.steps, "cpu")
    if reason is None:
        try:
            runtime_class(variant.deploy.runtime)
        except GreenoptError as e:
            reason = str(e)
    if reason:
        return {"name": name, "skipped": reason}
    t = time.perf_counter()
    try:
        cand, report = _realised(model, tok, variant)
    except GreenoptError as e:
        return {"name": name, "skipped": f"{type(e).__name__}: {e}"}
    build_s = time.perf_counter() - t

    def pair(r: int):
        if r == 0:
            return model, cand
        fresh, _ = _realised(model, tok, variant)
        return copy.deepcopy(model), fresh

    t = time.perf_counter()
    cmp = compare_repeated(pair, tok, protocol, meter, repeats)
    measure_s = time.perf_counter() - t
    grade = grade_comparison(cmp, scheme)
    t = time.perf_counter()
    ev = _scored(cand, tok, spec)
    eval_s = time.perf_counter() - t
    c = cmp.candidate
    return {
        "name": name, "variant_hash": variant.hash, "runtime": cand.describe().line(),
        "eei": cmp.eei, "eei_ci": list(cmp.eei_ci), "class": grade.display, "interval": cmp.interval,
        "eei_runs": list(cmp.runs) if cmp.runs else [], "joules_per_token": c.joules_per_token,
        "joules_per_token_ci": list(c.joules_per_token_ci), "tier": c.tier, "tokens_per_s": c.tokens_per_s,
        "baseline_tokens_per_s": cmp.baseline.tokens_per_s, "weight_mb": (cand.weight_bytes() or 0) / 1e6,
        "fast_kernel": report.fast_kernel if report else None, "accuracy": _accuracy(ev, base_eval),
        "build_s": round(build_s, 1), "measure_s": round(measure_s, 1), "eval_s": round(eval_s, 1),
    }


def _realised(model, tok, variant: Variant):
    runtime, report = deploy(copy.deepcopy(model), tok, variant)
    return runtime, report if variant.steps else None


def _scored(runtime, tok, spec: EvalSpec):
    return evaluate(runtime, tok, spec, keep_items=True)  # per item, for the paired differences


def _accuracy(ev, base) -> dict:
    out = {}
    for s, b in zip(ev.scores, base.scores, strict=True):
        row = {"value": s.value, "baseline": b.value, "n": s.n, "stderr": s.stderr}
        if s.items and b.items:
            d = paired_difference(s.items, b.items)
            row |= {"paired_diff": d.diff, "paired_stderr": d.stderr, "z": d.z}
        out[s.task] = row
    out["mean"] = sum(r["value"] for r in out.values()) / len(ev.scores)
    out["mean_baseline"] = sum(b.value for b in base.scores) / len(base.scores)
    return out


def _print(r: dict) -> None:
    if "skipped" in r:
        print(f"   skipped: {r['skipped']}")
        return
    acc = r["accuracy"]
    print(f"   {r['runtime']}")
    print(f"   EEI {r['eei']:.1f} [{r['eei_ci'][0]:.1f}, {r['eei_ci'][1]:.1f}] ({r['interval']}) class {r['class']}; "
          f"runs {', '.join(f'{x:.1f}' for x in r['eei_runs'])}")
    print(f"   J/token {r['joules_per_token']:.4g} (tier {r['tier']}), {r['tokens_per_s']:.1f} tokens/s "
          f"(baseline {r['baseline_tokens_per_s']:.1f}), weights {r['weight_mb']:.0f} MB; "
          f"build {r['build_s']} s, measure {r['measure_s']} s, eval {r['eval_s']} s")
    for task, t in acc.items():
        if isinstance(t, dict):
            paired = f", paired {100 * t['paired_diff']:+.1f} ± {100 * t['paired_stderr']:.1f} pts" \
                if "paired_diff" in t else ""
            print(f"   {task}: {t['value']:.3f} vs {t['baseline']:.3f} (n {t['n']}){paired}")


def _table(rows: list[dict]) -> None:
    print("\n| row | EEI [95% CI] | class | J/token | tokens/s | weights MB | mean acc (baseline) | paired Δ pts |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['name']} | skipped: {r['skipped']} | | | | | | |")
            continue
        acc = r["accuracy"]
        deltas = [t["paired_diff"] for t in acc.values() if isinstance(t, dict) and "paired_diff" in t]
        delta = f"{100 * sum(deltas) / len(deltas):+.1f}" if deltas else "n/a"
        print(f"| {r['name']} | {r['eei']:.1f} [{r['eei_ci'][0]:.1f}, {r['eei_ci'][1]:.1f}] | {r['class']} | "
              f"{r['joules_per_token']:.4g} ({r['tier']}) | {r['tokens_per_s']:.1f} | {r['weight_mb']:.0f} | "
              f"{acc['mean']:.3f} ({acc['mean_baseline']:.3f}) | {delta} |")


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500, help="items per task (0: full sets; default 500)")
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa"])
    p.add_argument("--comparisons", type=int, default=3, help="fresh comparisons per row (default 3)")
    p.add_argument("--protocol", default="cpu")
    p.add_argument("--meter", default="auto")
    p.add_argument("--cpu-watts", type=float)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="row names to run (default: all)")
    p.add_argument("--pick", help="a search run folder; its chosen.yaml becomes a row")
    p.add_argument("--out", default="docs/bench/runtimes.json")
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
