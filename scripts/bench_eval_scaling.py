"""Does evaluation scale with the vocabulary? lm-eval's HFLM against greenopt's lean LM (issue 12, item 5).

The same items of the same tasks are scored twice per model: by lm-eval's ``HFLM``
(``GREENOPT_EVAL_LM=hflm``: full-vocabulary logits and log-softmax at every position) and by
greenopt's lean LM (``greenopt.evaluate.lean_lm``: the head and the log-softmax only at the
continuation positions). Two models: the default model (SmolLM2-135M, vocabulary 49152) and a
synthetic large-vocabulary one (a tiny_llama-like config with a 200k vocabulary, seeded random
weights, the default model's tokenizer). Each arm runs in a fresh process, so its peak RSS is its
own: after loading, one warm-up item per task (imports, task loading), then the timed
evaluation. Prints seconds and peak RSS side by side with their ratios (lean / hflm), the CPU
flags and the thread count, and fails (exit 1) unless both arms give the same per-item scores.

Timings need a quiet CPU; ``--limit 2`` only checks that it runs.

    python scripts/bench_eval_scaling.py --limit 100            # arc_easy + piqa, 100 items each
    python scripts/bench_eval_scaling.py --limit 2 --models large
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from greenopt.config import EvalSpec
from greenopt.env import cpu_flags
from greenopt.evaluate import evaluate
from greenopt.models import load_model, resolve
from greenopt.testing import tiny_llama

ARMS = ("hflm", "lean")
MODELS = ("default", "large")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load(which: str, vocab: int):
    if which == "default":
        model, tok, _ = load_model("default", dtype="float32", device="cpu")
        return model, tok
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("default")[1])  # its ids all fall inside the larger vocabulary
    return tiny_llama(seed=0, vocab=vocab, hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2), tok


def child(args: argparse.Namespace) -> int:
    """One arm on one model, in this process; writes its figures to ``args.out``."""
    os.environ["GREENOPT_EVAL_LM"] = args.arm
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _load(args.model, args.vocab)
    tasks = tuple(args.tasks.split(","))
    evaluate(model, tok, EvalSpec(tasks=tasks, limit=1, batch_size=args.batch_size))  # warm-up
    before = _rss_mib()
    t = time.perf_counter()
    res = evaluate(model, tok, EvalSpec(tasks=tasks, limit=args.limit, batch_size=args.batch_size), keep_items=True)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before,
           "vocab": int(model.config.vocab_size), "params": sum(p.numel() for p in model.parameters()),
           "scores": {s.task: {"metric": s.metric, "value": s.value, "items": s.items} for s in res.scores}}
    Path(args.out).write_text(json.dumps(out))
    return 0


def _run_arm(args: argparse.Namespace, model: str, arm: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--child", "--model", model, "--arm", arm, "--out", out,
           "--limit", str(args.limit), "--tasks", args.tasks, "--batch-size", str(args.batch_size),
           "--vocab", str(args.vocab)] + (["--threads", str(args.threads)] if args.threads else [])
    try:
        subprocess.run(cmd, check=True)
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def _mismatches(a: dict, b: dict) -> list[str]:
    bad = []
    for task, sa in a["scores"].items():
        sb = b["scores"][task]
        if sa["items"] != sb["items"] or abs(sa["value"] - sb["value"]) > 1e-9:
            bad.append(f"{task}: hflm {sa['metric']} {sa['value']:.4f}, lean {sb['value']:.4f}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100, help="items per task (default 100)")
    ap.add_argument("--tasks", default="arc_easy,piqa", help="comma-separated tasks with per-item accuracies")
    ap.add_argument("--models", default=",".join(MODELS), help="default, large, or both")
    ap.add_argument("--vocab", type=int, default=200_064, help="the large model's vocabulary")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--arm", default="lean", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    threads = args.threads or torch.get_num_threads()
    print(f"cpu flags: {' '.join(cpu_flags()) or '(none of interest)'}; torch threads {threads}; "
          f"torch {torch.__version__}; float32; tasks {args.tasks}, {args.limit} items each, batch {args.batch_size}")
    print(f"{'model':<10} {'vocab':>7} {'params':>8} | {'hflm s':>8} {'lean s':>8} {'ratio':>6} | "
          f"{'hflm peak MiB':>13} {'lean peak MiB':>13} {'ratio':>6} | {'eval MiB h/l':>13}")
    failed = []
    for model in args.models.split(","):
        r = {arm: _run_arm(args, model, arm) for arm in ARMS}
        h, lean = r["hflm"], r["lean"]
        grow = [max(0.0, x["peak_rss_mib"] - x["rss_before_mib"]) for x in (h, lean)]
        print(f"{model:<10} {h['vocab']:>7} {h['params'] / 1e6:>7.1f}M | {h['seconds']:>8.1f} {lean['seconds']:>8.1f} "
              f"{lean['seconds'] / h['seconds']:>6.2f} | {h['peak_rss_mib']:>13.0f} {lean['peak_rss_mib']:>13.0f} "
              f"{lean['peak_rss_mib'] / h['peak_rss_mib']:>6.2f} | {grow[0]:>6.0f}/{grow[1]:<6.0f}", flush=True)
        for task, s in h["scores"].items():
            print(f"  {task}: {s['metric']} {s['value']:.4f} (hflm) {lean['scores'][task]['value']:.4f} (lean)")
        failed += [f"{model} {m}" for m in _mismatches(h, lean)]
    print("eval MiB: peak RSS above the RSS before the timed evaluation (0 when loading peaked higher)")
    for f in failed:
        print(f"MISMATCH {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
