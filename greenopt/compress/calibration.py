"""The calibration sample shared by every move that needs one, and activation statistics.

Text comes from the Wikipedia ``calibration`` split (disjoint from prompts and evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from greenopt import data
from greenopt.config import CalibSpec

_CACHE: dict[tuple, torch.Tensor] = {}


def calibration_batch(tokenizer, spec: CalibSpec) -> torch.LongTensor:
    """``[spec.samples, spec.seq_len]`` token ids: seeded windows over the calibration text.

    Cached per (tokenizer, spec), so every move in a process sees the same sample.
    """
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), spec)
    if key not in _CACHE:
        ids = tokenizer("\n\n".join(data.wiki_split("calibration")), return_tensors="pt",
                        add_special_tokens=False).input_ids[0]
        if ids.numel() < spec.seq_len + 1:
            raise ValueError("calibration text is shorter than one sample")
        g = torch.Generator().manual_seed(spec.seed)
        starts = torch.randint(0, ids.numel() - spec.seq_len, (spec.samples,), generator=g)
        _CACHE[key] = torch.stack([ids[s:s + spec.seq_len] for s in starts.tolist()])
    return _CACHE[key]


@contextlib.contextmanager
def capture(modules: dict[str, torch.nn.Module], fn) -> Iterator[None]:
    """Calls ``fn(name, module, inputs, output)`` on every forward of the given modules."""
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: fn(n, mod, inp, out))
               for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def run_batches(model: torch.nn.Module, batch: torch.LongTensor, rows_per_step: int = 8) -> None:
    """Runs the calibration batch through the model (outputs discarded)."""
    device = next(model.parameters()).device
    for i in range(0, batch.shape[0], rows_per_step):
        model(batch[i:i + rows_per_step].to(device), use_cache=False)


def input_feature_norms(model: torch.nn.Module, modules: dict[str, torch.nn.Module],
                        batch: torch.LongTensor) -> dict[str, torch.Tensor]:
    """L2 norm over all calibration tokens of each input feature of each module (float32, cpu).

    This is Wanda's ``||X_j||`` and the activation score for channel pruning.
    """
    sq: dict[str, torch.Tensor] = {}

    def hook(name, mod, inp, out):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        s = (x * x).sum(0).cpu()
        sq[name] = sq[name] + s if name in sq else s

    with capture(modules, hook):
        run_batches(model, batch)
    return {n: v.sqrt() for n, v in sq.items()}
