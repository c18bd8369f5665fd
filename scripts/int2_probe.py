"""How far can INT2 go on the default model? Perplexity of a handful of INT2 mixes.

Perplexity on held-aside Wikipedia text (``wiki_split("perplexity")``, first ``--tokens``
tokens, windows of 512), one CPU thread. Mixes keep sensitive layers (attention, first and
last blocks) at 4-8 bits and put the FFNs of the middle blocks at 2 bits.

    GREENOPT_HOME=~/.cache/greenopt python scripts/int2_probe.py [--tokens 4096] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from greenopt import offline
from greenopt.compress import ApplyContext, accounting, apply
from greenopt.config import CalibSpec, QuantizeStep, QuantOverride, Target, Variant
from greenopt.models import load_model

FFN = ("*mlp*",)
MID = "4-25"


def _mix(method: str, ffn_bits: int, ffn_group: int, rest_bits: int, rest_group: int) -> Variant:
    """FFN of layers 4-25 at ffn_bits; everything else (attention, layers 0-3 and 26-29) at rest_bits."""
    return Variant(steps=[QuantizeStep(method=method, bits=rest_bits, group_size=rest_group, overrides=(
        QuantOverride(target=Target(include=FFN, layers=MID), bits=ffn_bits, group_size=ffn_group),))])


def _uniform(method: str, bits: int, group: int) -> Variant:
    return Variant(steps=[QuantizeStep(method=method, bits=bits, group_size=group)])


CONFIGS: dict[str, Variant] = {
    "fp32 baseline": Variant(),
    "rtn int4 g192 (all)": _uniform("rtn", 4, 192),
    "rtn int2 g16 (all)": _uniform("rtn", 2, 16),
    "gptq int2 g16 (all)": _uniform("gptq", 2, 16),
    "rtn ffn4-25 int2 g16, rest int4 g32": _mix("rtn", 2, 16, 4, 32),
    "gptq ffn4-25 int2 g16, rest int4 g32": _mix("gptq", 2, 16, 4, 32),
    "gptq ffn4-25 int2 g32, rest int8 g64": _mix("gptq", 2, 32, 8, 64),
    "gptq ffn4-25 int2 g64, rest int4 g64": _mix("gptq", 2, 64, 4, 64),
}


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    nll, n = 0.0, 0
    for i in range(0, ids.numel() - 1, window):
        chunk = ids[i:i + window + 1].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        loss = model(chunk[:, :-1], labels=chunk[:, :-1]).loss
        k = chunk.shape[1] - 2
        nll += loss.item() * k
        n += k
    return math.exp(nll / n)


def linear_bits(model) -> float:
    """Mean stored bits per weight over decoder-layer Linears (numel-weighted)."""
    per_layer = accounting.bits_per_layer(model)
    total = bits = 0.0
    for name, m in model.named_modules():
        if name in per_layer and ".layers." in name:
            n = m.in_features * m.out_features
            total, bits = total + n, bits + per_layer[name] * n
    return bits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None, help="config names to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, tok, _ = load_model("default")
    ids = tok("\n\n".join(offline.wiki_split("perplexity")), return_tensors="pt").input_ids[0][: args.tokens + 1]
    calib = CalibSpec(samples=args.calib_samples, seq_len=128)
    print(f"perplexity on {ids.numel() - 1} held-aside tokens; gptq calibration {calib.samples}x{calib.seq_len}")
    print(f"| variant | bits/weight (layers) | weight MB | perplexity | time s |\n|---|---|---|---|---|")
    for name, variant in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        model, _, _ = load_model("default")
        t0 = time.perf_counter()
        apply(model, variant, ctx=ApplyContext(tokenizer=tok, calib=calib))
        ppl = perplexity(model, ids)
        print(f"| {name} | {linear_bits(model):.2f} | {accounting.weight_bytes(model) / 1e6:.0f} | "
              f"{ppl:,.1f} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
