"""Does the KL look rank variants as accuracy does? (greenopt issue 12, docs/FIDELITY.md)

On the real default model, for each variant: the KL look against the baseline's cached
reference (on the variant as applied, the deployed module), and accuracy on arc_easy and
piqa on a fixed seeded subset, paired item by item against the baseline. Prints a table,
the Spearman rank correlation of KL with the mean accuracy drop, and a fitted mapping from an
accuracy-drop budget to a KL cut; writes everything to docs/bench/fidelity.json.

Weight-only quantized variants are scored for accuracy through a dequantized twin (exact for
``x @ dequant(W).T`` layers, checked by its logits agreement; scripts/benchlib.py), which runs
at fp32 speed. Timings are information only (a shared CPU), not performance figures.

    python scripts/bench_fidelity.py --limit 0          # the full task sets, 26 variants
    python scripts/bench_fidelity.py --limit 200
    python scripts/bench_fidelity.py --limit 50 --only rtn,depth   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch
from benchlib import DequantizedTwin, twinnable
from scipy import stats

from greenopt._io import write_bytes
from greenopt.compress import apply
from greenopt.config import (
    DepthStep,
    EvalSpec,
    HealStep,
    KLSpec,
    MoefyStep,
    PruneStep,
    QuantizeStep,
    Variant,
    WidthStep,
)
from greenopt.evaluate import evaluate
from greenopt.evaluate.fidelity import baseline_reference, kl_look, paired_difference
from greenopt.models import load_model

log = logging.getLogger("bench_fidelity")
TASKS = ("arc_easy", "piqa")
VARIANTS: list[tuple[str, Variant]] = [
    *[(f"{m} {b}b g64", Variant(steps=[QuantizeStep(method=m, bits=b, group_size=64)]))
      for m in ("rtn", "hqq") for b in (8, 4, 3, 2)],
    *[(f"depth -{d}", Variant(steps=[DepthStep(drop=d)])) for d in (2, 4, 8)],
    ("width ffn 75%", Variant(steps=[WidthStep(ffn_keep=0.75)])),
    ("width ffn 50%", Variant(steps=[WidthStep(ffn_keep=0.5)])),
    ("wanda 50%", Variant(steps=[PruneStep(method="wanda", sparsity=0.5)])),
    ("magnitude 50%", Variant(steps=[PruneStep(method="magnitude", sparsity=0.5)])),
    ("wanda 2:4", Variant(steps=[PruneStep(method="wanda", pattern="2:4")])),
    # More of what the search samples: milder and deeper cuts, MoE-style FFNs, healed cuts, combinations.
    *[(f"depth -{d}", Variant(steps=[DepthStep(drop=d)])) for d in (1, 3, 6)],
    ("width ffn 87.5%", Variant(steps=[WidthStep(ffn_keep=0.875)])),
    ("width ffn 62.5%", Variant(steps=[WidthStep(ffn_keep=0.625)])),
    ("wanda 30%", Variant(steps=[PruneStep(method="wanda", sparsity=0.3)])),
    *[(f"moe {k}/8", Variant(steps=[MoefyStep(experts=8, top_k=k)])) for k in (2, 4)],
    # healing bounded by steps, not seconds, so a busy CPU changes the time, not the result
    ("depth -4 + heal", Variant(steps=[DepthStep(drop=4), HealStep(steps=40, max_seconds=3600)])),
    ("width 50% + heal", Variant(steps=[WidthStep(ffn_keep=0.5), HealStep(steps=40, max_seconds=3600)])),
    ("depth -2 + rtn 4b", Variant(steps=[DepthStep(drop=2), QuantizeStep(method="rtn", bits=4, group_size=64)])),
    ("ffn 75% + hqq 4b", Variant(steps=[WidthStep(ffn_keep=0.75), QuantizeStep(method="hqq", bits=4, group_size=64)])),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="items per task (default 200; 0: the full sets)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names")
    ap.add_argument("--out", default="docs/bench/fidelity.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    variants = [(n, v) for n, v in VARIANTS if not wanted or any(w in n for w in wanted)]

    model, tok, _ = load_model("default", dtype="float32", device="cpu")
    spec = KLSpec(windows=args.windows, tokens=args.tokens, top_k=args.top_k)
    eval_spec = EvalSpec(tasks=TASKS, limit=args.limit or None)
    t = time.perf_counter()
    ref = baseline_reference(model, tok, spec)
    ref_s = time.perf_counter() - t
    mass = float(ref.top_logp.exp().sum(-1).mean())
    print(f"reference {ref.key}: {ref.input_ids.shape[0]} x {ref.input_ids.shape[1]} tokens, top {ref.top_k} "
          f"hold {mass:.3f} of the mass on average; {ref_s:.1f} s (cached after the first run)", flush=True)
    t = time.perf_counter()
    base_eval = evaluate(model, tok, eval_spec, keep_items=True)
    print(f"baseline: {_accs(base_eval)} in {time.perf_counter() - t:.0f} s", flush=True)
    self_kl = kl_look(copy.deepcopy(model), ref, tok)

    rows, failed = [], []
    for name, variant in variants:
        try:
            rows.append(_row(name, variant, model, tok, ref, eval_spec, base_eval))
        except Exception as e:  # a bench run goes on past one broken move, and says so in its output
            log.exception("variant %s failed", name)
            failed.append({"name": name, "error": f"{type(e).__name__}: {e}"})
    _print_table(rows)
    for f in failed:
        print(f"FAILED {f['name']}: {f['error']}")
    summary = _summary(rows)
    print(f"\nSpearman(KL, mean accuracy drop) = {summary['spearman_rho']:.3f} "
          f"(p = {summary['spearman_p']:.3g}, {summary['variants']} variants)")
    fit = summary["fit"]
    print(f"fit: drop = {fit['a']:.4f} + {fit['b']:.4f} * log10(KL)  (R^2 {fit['r2']:.2f}); KL cuts:")
    for budget, cut in summary["kl_cut_for_drop"].items():
        print(f"  drop budget {budget}: KL <= {cut:.4g} nats/token")

    out = {"environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "machine": platform.machine(), "threads": torch.get_num_threads()},
           "kl_spec": spec.model_dump(), "eval_spec": eval_spec.model_dump(), "reference_key": ref.key,
           "reference_top_k_mass": mass, "reference_s": ref_s, "baseline_self_kl": self_kl.model_dump(),
           "baseline": {s.task: {"acc": s.value, "stderr": s.stderr, "n": s.n} for s in base_eval.scores},
           "rows": rows, "failed": failed, "summary": summary}
    write_bytes(Path(args.out), (json.dumps(out, indent=1) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


def _row(name: str, variant: Variant, model, tok, ref, eval_spec: EvalSpec, base_eval) -> dict:
    cand = copy.deepcopy(model)
    t = time.perf_counter()
    report = apply(cand, variant, tokenizer=tok)
    apply_s = time.perf_counter() - t
    look = kl_look(cand, ref, tok)  # the variant as applied, never its twin
    t = time.perf_counter()
    scored_on, agreement = "model", {}
    if twinnable(variant):
        with DequantizedTwin(cand, ref.input_ids[:2]) as twin:
            ev = evaluate(cand, tok, eval_spec, keep_items=True)
            scored_on, agreement = f"dequantized twin ({twin.swapped} layers)", twin.agreement
    else:
        ev = evaluate(cand, tok, eval_spec, keep_items=True)
    eval_s = time.perf_counter() - t
    paired = {s.task: paired_difference(s.items, base_eval.score(s.task).items) for s in ev.scores}
    # mean drop (baseline - candidate) over tasks; the tasks' items are independent, so variances add
    drop = -sum(p.diff for p in paired.values()) / len(paired)
    drop_se = math.sqrt(sum(p.stderr ** 2 for p in paired.values())) / len(paired)
    unpaired = math.sqrt(sum((s.stderr or 0) ** 2 + (base_eval.score(s.task).stderr or 0) ** 2
                             for s in ev.scores)) / len(ev.scores)
    row = {"name": name, "variant_hash": variant.hash, "steps": [s.model_dump(mode="json") for s in variant.steps],
           "kl": look.model_dump(), "acc": {s.task: s.value for s in ev.scores},
           "paired_drop": {t: p.model_dump() for t, p in paired.items()},
           "mean_drop": drop, "mean_drop_paired_se": drop_se, "mean_drop_unpaired_se": unpaired,
           "weight_bytes": report.weight_bytes_after, "apply_s": apply_s, "kl_s": look.duration_s,
           "eval_s": eval_s, "scored_on": scored_on, "twin_agreement": agreement}
    print(f"{name:16s} KL {look.kl_nats_per_token:.4f} ({look.duration_s:.1f} s)  drop {drop:+.4f} "
          f"+- {drop_se:.4f} paired ({unpaired:.4f} unpaired)  [{_accs(ev)}]", flush=True)
    del cand
    gc.collect()
    return row


def _accs(ev) -> str:
    return ", ".join(f"{s.task} {s.value:.3f}" for s in ev.scores)


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'variant':16s} {'KL nats/tok':>11s} {'max win':>8s} {'p99 pos':>8s} {'KL s':>5s} "
          + " ".join(f"{t + ' d':>12s}" for t in TASKS) + f" {'mean drop':>10s} {'paired se':>9s} {'unp. se':>8s}")
    for r in sorted(rows, key=lambda r: r["kl"]["kl_nats_per_token"]):
        k = r["kl"]
        diffs = " ".join(f"{r['paired_drop'][t]['diff']:+12.3f}" for t in TASKS)
        print(f"{r['name']:16s} {k['kl_nats_per_token']:11.4f} {k['window_kl_max_nats_per_token']:8.3f} "
              f"{k['position_kl_p99_nats']:8.3f} {r['kl_s']:5.1f} {diffs} {r['mean_drop']:+10.4f} "
              f"{r['mean_drop_paired_se']:9.4f} {r['mean_drop_unpaired_se']:8.4f}")


def _summary(rows: list[dict]) -> dict:
    """Spearman of KL with the accuracy drop, and drop = a + b log10(KL) fitted by least squares."""
    kl = [r["kl"]["kl_nats_per_token"] for r in rows]
    drop = [r["mean_drop"] for r in rows]  # positive: the variant lost accuracy
    rho, p = stats.spearmanr(kl, drop)
    finite = [(math.log10(k), d) for k, d in zip(kl, drop) if 0 < k < math.inf]
    fit = stats.linregress([x for x, _ in finite], [d for _, d in finite])
    cuts = {str(b): 10 ** ((b - fit.intercept) / fit.slope) for b in (0.01, 0.02, 0.05, 0.10)} if fit.slope > 0 else {}
    return {"variants": len(rows), "spearman_rho": float(rho), "spearman_p": float(p),
            "fit": {"a": fit.intercept, "b": fit.slope, "r2": fit.rvalue ** 2, "points": len(finite)},
            "kl_cut_for_drop": cuts}


if __name__ == "__main__":
    sys.exit(main())
