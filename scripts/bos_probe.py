#!/usr/bin/env python3
"""Perplexity of a model on the quick look's held-aside windows with and without BOS.

The quick look and every calibrated move read windows that start at a paragraph, after BOS
where the tokenizer itself puts BOS before text (greenopt.compress.calibration.leading_bos).
This prints what BOS changes on a given model: the same paragraph starts scored with the
tokenizer's BOS token prepended and without it, and which of the two greenopt uses.

Usage: python scripts/bos_probe.py [--model default] [--windows 16] [--tokens 128]
"""

from __future__ import annotations

import argparse
import math
import platform

import torch

from greenopt import offline
from greenopt.compress.calibration import leading_bos, text_windows
from greenopt.models import load_model


class _NoBos:
    """The tokenizer as the old code used it: same text, no BOS."""

    def __init__(self, tok):
        self._tok = tok
        self.bos_token_id = None

    def __call__(self, *a, **k):
        return self._tok(*a, **k)


def _ppl(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        return math.exp(model(input_ids=ids, labels=ids, use_cache=False).loss.float().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok, info = load_model(args.model)
    print(f"model {info.model_id}; CPU {platform.processor() or platform.machine()}; bos_token {tok.bos_token!r} "
          f"(id {tok.bos_token_id})")
    for split in ("perplexity", "calibration"):
        arts = offline.wiki_split(split)
        without = text_windows(_NoBos(tok), arts, args.windows, args.tokens)
        line = f"{split:12s} {args.windows} x {args.tokens} tokens: perplexity without BOS {_ppl(model, without):.2f}"
        if tok.bos_token_id is not None:
            with_bos = torch.cat([torch.full((len(without), 1), tok.bos_token_id), without[:, :-1]], dim=1)
            line += f", with BOS {_ppl(model, with_bos):.2f}"
        print(line)
    uses = "with" if leading_bos(tok) else "without"
    print(f"greenopt uses the windows {uses} BOS (the tokenizer {'adds' if leading_bos(tok) else 'does not add'} "
          "BOS to text it encodes)")


if __name__ == "__main__":
    main()
