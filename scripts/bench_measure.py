"""How repeatable is a GO-1 measurement? Runs measure() R times and compare(model, model).

Prints, per run: J/token, tier, tokens/s and the wall time of one measurement; then the CV of
J/token across runs; then the EEI of the model against itself (should be ~100 with an
interval containing 100). Run it on a quiet machine: other processes move the figures.

Usage:
    GREENOPT_HOME=~/.cache/greenopt python scripts/bench_measure.py [--preset cpu] [--runs 3]
        [--threads 2] [--meter auto] [--cpu-watts W] [--tiny]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from greenopt.config import protocol_preset
from greenopt.measure import compare, measure, select_meter
from greenopt.measure.stats import coefficient_of_variation


def load(tiny: bool, device: str):
    if tiny:
        from greenopt.testing import tiny_llama, tiny_tokenizer

        return tiny_llama().to(device), tiny_tokenizer(), "tiny_llama (test model)"
    from greenopt.models import load_model

    model, tokenizer, info = load_model("default", device=device)
    return model, tokenizer, f"{info.model_id} ({info.dtype})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", help="protocol preset (default cpu)")
    ap.add_argument("--runs", type=int, default=3, help="measure() repetitions (default 3)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch.set_num_threads, pinned for every run (default: torch's)")
    ap.add_argument("--meter", default="auto", help="auto, nvml, rapl or estimate")
    ap.add_argument("--cpu-watts", type=float, default=None, help="W per busy core for the estimate")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny test model (no download)")
    ap.add_argument("--no-compare", action="store_true", help="skip compare(model, model)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    protocol = protocol_preset(args.preset)
    model, tokenizer, name = load(args.tiny, args.device)
    meter = select_meter(args.meter, cpu_watts=args.cpu_watts, device=args.device)
    info = meter.device()
    print(f"model {name} on {args.device}, {args.threads} threads; protocol {protocol.id} ({protocol.preset})")
    print(f"meter {meter.name} tier {meter.tier}: {info.name} | {info.boundary}")

    jpts = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        m = measure(model, tokenizer, protocol, meter)
        wall = time.perf_counter() - t0
        jpts.append(m.joules_per_token)
        lo, hi = m.joules_per_token_ci
        print(f"run {i + 1}: {m.joules_per_token:.5f} J/token [{lo:.5f}, {hi:.5f}] tier {m.tier} "
              f"(source {m.source_tier}) trial-CV {m.cv:.3f} {m.tokens_per_s:.1f} tok/s "
              f"{m.mean_power_w:.1f} W idle {m.idle_power_w or 0:.1f} W decode "
              f"{m.decode_joules_per_token or float('nan'):.5f} J/tok prefill "
              f"{m.prefill_joules_per_prompt_token or float('nan'):.5f} J/prompt-tok "
              f"wall {wall:.1f} s flags {list(m.flags) or '-'}")
    if len(jpts) > 1:
        print(f"CV of J/token across {len(jpts)} runs: {coefficient_of_variation(jpts):.4f}")

    if not args.no_compare:
        t0 = time.perf_counter()
        c = compare(model, model, tokenizer, protocol, meter)
        wall = time.perf_counter() - t0
        inside = c.eei_ci[0] <= 100.0 <= c.eei_ci[1]
        print(f"compare(model, model): EEI {c.eei:.1f} [{c.eei_ci[0]:.1f}, {c.eei_ci[1]:.1f}] "
              f"contains 100: {inside}; tier {c.tier}; wall {wall:.1f} s; flags "
              f"{list(c.baseline.flags) or '-'} / {list(c.candidate.flags) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
