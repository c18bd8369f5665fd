"""Each compression move alone, beside the unmodified model, in one process (issue 3).

Prints per variant: tokens/s ratio and J/token ratio (EEI) vs the baseline measured in the
same A B A B run, with tier; parameter bytes; perplexity on held-aside Wikipedia text;
ARC-Easy accuracy on a fixed seeded subset. Writes the table as Markdown for docs/MOVES.md.

    python scripts/bench_moves.py --threads 2 --out docs/MOVES.md
    python scripts/bench_moves.py --only depth,width --protocol quick   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import platform
import sys
import time

import torch

from greenopt import offline
from greenopt.compress import apply
from greenopt.config import (
    DepthStep,
    EvalSpec,
    MoefyStep,
    PruneStep,
    QuantizeStep,
    Target,
    Variant,
    WidthStep,
    protocol_preset,
)
from greenopt.evaluate import evaluate
from greenopt.measure.select import select_meter
from greenopt.measure.workload import compare
from greenopt.models import load_model

FFN = Target(include=("*mlp*",))
MOVES: dict[str, list[tuple[str, Variant]]] = {
    "quant": [
        ("bnb nf4", Variant(steps=[QuantizeStep(method="bnb_nf4", bits=4)])),
        ("torchao int8 wo", Variant(steps=[QuantizeStep(method="torchao_int8", bits=8)])),
        ("hqq 4b g64", Variant(steps=[QuantizeStep(method="hqq", bits=4, group_size=64)])),
        ("gptq 4b g64", Variant(steps=[QuantizeStep(method="gptq", bits=4, group_size=64)])),
    ],
    "prune": [
        ("wanda 50%", Variant(steps=[PruneStep(method="wanda", sparsity=0.5)])),
        ("2:4 wanda", Variant(steps=[PruneStep(method="wanda", pattern="2:4")])),
    ],
    "depth": [
        ("depth -4", Variant(steps=[DepthStep(drop=4)])),
        ("depth -8", Variant(steps=[DepthStep(drop=8)])),
    ],
    "width": [
        ("width ffn 75%", Variant(steps=[WidthStep(ffn_keep=0.75)])),
        ("width ffn 50%", Variant(steps=[WidthStep(ffn_keep=0.5)])),
    ],
    "moefy": [
        ("moefy 8x4", Variant(steps=[MoefyStep(experts=8, top_k=4)])),
    ],
}


@torch.inference_mode()
def perplexity(model, tok, max_tokens: int = 4096, window: int = 512) -> float:
    """Token perplexity over the first ``max_tokens`` of the held-aside Wikipedia split."""
    ids = tok("\n\n".join(offline.wiki_split("perplexity")), return_tensors="pt").input_ids[0][:max_tokens]
    nll, n = 0.0, 0
    for i in range(0, ids.numel() - 1, window):
        chunk = ids[i:i + window + 1].unsqueeze(0)
        logits = model(chunk[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--protocol", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=200, help="ARC-Easy items (fixed seeded subset)")
    ap.add_argument("--only", help="comma list of move families: " + ",".join(MOVES))
    ap.add_argument("--meter", default="auto")
    ap.add_argument("--out", help="write the Markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = protocol_preset(args.protocol)
    meter = select_meter(args.meter, device="cpu")
    base, tok, info = load_model(args.model)
    spec = EvalSpec(tasks=("arc_easy",), limit=args.limit)
    base_acc = evaluate(base, tok, spec).score("arc_easy").value
    base_ppl = perplexity(base, tok)
    families = args.only.split(",") if args.only else list(MOVES)
    rows = [("baseline (fp32)", 1.0, 100.0, (100.0, 100.0), "-", _bytes(base), base_ppl, base_acc,
             "-", "")]
    for fam in families:
        for name, variant in MOVES[fam]:
            t0 = time.perf_counter()
            cand = copy.deepcopy(base)
            try:
                rep = apply(cand, variant, tokenizer=tok)
                cmp = compare(base, cand, tok, protocol, meter)
                acc = evaluate(cand, tok, spec).score("arc_easy").value
                ppl = perplexity(cand, tok)
                speed = cmp.candidate.tokens_per_s / cmp.baseline.tokens_per_s
                fast = {True: "yes", False: "no", None: "-"}[rep.fast_kernel]
                rows.append((name, speed, cmp.eei, cmp.eei_ci, cmp.tier, rep.weight_bytes_after, ppl, acc, fast,
                             "; ".join(cmp.candidate.flags)))
            except Exception as e:  # a move that fails on this machine is a row, not a crash
                rows.append((name, float("nan"), float("nan"), (float("nan"),) * 2, "-", 0, float("nan"),
                             float("nan"), "-", f"FAILED: {type(e).__name__}: {str(e)[:80]}"))
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            del cand
            gc.collect()
    header = (f"Model {info.model_id}, {platform.processor() or platform.machine()}, {args.threads} threads, "
              f"protocol {protocol.id}, meter {meter.name} (tier {meter.tier}), torch {torch.__version__}; "
              f"ARC-Easy acc_norm on {args.limit} seeded items; perplexity on 4096 held-aside Wikipedia tokens.")
    table = ["| variant | tokens/s ratio | EEI (J/token ratio x100) [95%] | tier | weight MB | ppl | ARC-Easy | "
             "fast kernel | flags |", "|---|---|---|---|---|---|---|---|---|"]
    for name, sp, eei, ci, tier, b, ppl, acc, fast, flags in rows:
        table.append(f"| {name} | {sp:.2f} | {eei:.1f} [{ci[0]:.1f}-{ci[1]:.1f}] | {tier} | {b / 1e6:.1f} | "
                     f"{ppl:.2f} | {acc:.3f} | {fast} | {flags} |")
    text = header + "\n\n" + "\n".join(table) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def _bytes(model) -> int:
    from greenopt.compress.accounting import weight_bytes

    return weight_bytes(model)


if __name__ == "__main__":
    sys.exit(main())
