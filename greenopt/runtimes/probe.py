"""The kernel probe: a few seconds of micro-benchmarks that say which compute paths are fast here.

Fewer bits are not fewer joules: whether bf16 or an int4 kernel beats fp32 depends on the CPU
(AVX2 vs AVX-512 BF16 vs AMX) and the torch build. ``probe_kernels()`` times one decode-shaped
matmul (batch 1, the default model's FFN shape) per path, as a ratio to fp32 in the same run,
and the search leaves out of its space what has no fast path here, saying why
(:func:`fast_dtypes`). The figures are ratios from one short run, not a benchmark: they decide
what is worth measuring, never a label.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from greenopt.env import cpu_flags
from greenopt.records import KernelProbe, KernelTiming

#: A path counts as fast when it takes at most this fraction of fp32's time per call.
FAST_RATIO = 0.9

Bench = Callable[[dict[str, Callable[[], object]]], dict[str, float]]


def probe_kernels(*, in_features: int = 576, out_features: int = 1536, budget_s: float = 0.25,
                  bench: Bench | None = None) -> KernelProbe:
    """Times fp32, bf16 and fp16 matmuls and torch's int8/int4 weight-only CPU kernels at batch 1.

    Args:
        in_features, out_features: the weight shape (default: SmolLM2-135M's FFN up projection).
        budget_s: wall seconds per path. Paths run interleaved, one batch of calls each per round
            for 5 rounds (the median kept), so background load falls on all of them alike.
        bench: ``bench({name: fn}) -> {name: seconds per call}``; tests inject one to force each path.

    Returns:
        The timings, each with its ratio to fp32 and whether it is fast here, plus the CPU flags
        and thread count they hold for.
    """
    t0 = time.perf_counter()
    x = torch.randn(1, in_features)
    w = torch.randn(out_features, in_features)
    paths = _paths(x, w)
    runnable, missing = {}, {}
    for name, fn in paths.items():
        if isinstance(fn, str):  # the kernel is missing from this torch build
            missing[name] = fn
            continue
        try:
            with torch.inference_mode():
                fn()
            runnable[name] = fn
        except (RuntimeError, NotImplementedError) as e:
            missing[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    seconds = (bench or (lambda fns: _interleaved(fns, budget_s)))(runnable)
    fp32_s = seconds["matmul float32"]
    timings = []
    for name in paths:
        if name in missing:
            timings.append(KernelTiming(name=name, seconds_per_call=None, ratio_to_fp32=None, fast=False,
                                        note=missing[name]))
            continue
        ratio = seconds[name] / fp32_s
        timings.append(KernelTiming(name=name, seconds_per_call=seconds[name], ratio_to_fp32=ratio,
                                    fast=name != "matmul float32" and ratio <= FAST_RATIO))
    return KernelProbe(cpu_flags=cpu_flags(), threads=torch.get_num_threads(), timings=tuple(timings),
                       shape=(in_features, out_features), duration_s=time.perf_counter() - t0)


def fast_dtypes(probe: KernelProbe, wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The compute dtypes of ``wanted`` with a fast path here, and why each other one is left out.

    bfloat16 counts as fast when its matmul is, or when a low-bit kernel that takes bfloat16
    activations is (the int4/int8 weight-only kernels run only in bf16, so bf16 is worth
    measuring with them even where a dense bf16 matmul is slower than fp32).
    """
    by_name = {t.name: t for t in probe.timings}
    kept, why = [], {}
    for dtype in wanted:
        t = by_name.get(f"matmul {dtype}")
        lowbit = [k for k in probe.timings if dtype == "bfloat16" and "bf16 activations" in k.name and k.fast]
        if dtype == "float32" or (t is not None and t.fast) or lowbit:
            kept.append(dtype)
        elif t is None or t.ratio_to_fp32 is None:
            why[dtype] = f"no {dtype} matmul here ({t.note if t else 'not probed'})"
        else:
            why[dtype] = (f"{dtype} matmul took {t.ratio_to_fp32:.2f}x fp32's time at batch 1 on this CPU "
                          f"(fast means <= {FAST_RATIO:g}x)" + (" and no low-bit kernel with bf16 activations was "
                                                                 "fast either" if dtype == "bfloat16" else ""))
    return tuple(kept), why


def _paths(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], object] | str]:
    xb, wb = x.bfloat16(), w.bfloat16()
    xh, wh = x.half(), w.half()
    paths: dict[str, Callable[[], object] | str] = {
        "matmul float32": lambda: x @ w.t(),
        "matmul bfloat16": lambda: xb @ wb.t(),
        "matmul float16": lambda: xh @ wh.t(),
    }
    n, k = w.shape
    if hasattr(torch, "_weight_int8pack_mm"):
        w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        s8 = torch.rand(n, dtype=torch.bfloat16)
        paths["int8 weight-only (_weight_int8pack_mm, bf16 activations)"] = lambda: torch._weight_int8pack_mm(xb, w8, s8)
    else:
        paths["int8 weight-only (_weight_int8pack_mm, bf16 activations)"] = "torch has no _weight_int8pack_mm"
    name4 = "int4 weight-only (_weight_int4pack_mm_for_cpu, group 32, bf16 activations)"
    if hasattr(torch, "_weight_int4pack_mm_for_cpu") and k % 32 == 0:
        def int4() -> object:
            return torch._weight_int4pack_mm_for_cpu(xb, packed, 32, zs)
        packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
        zs = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
        paths[name4] = int4
    else:
        paths[name4] = "torch has no _weight_int4pack_mm_for_cpu (or the shape is not a multiple of 32)"
    return paths


def _interleaved(fns: dict[str, Callable[[], object]], budget_s: float, rounds: int = 5) -> dict[str, float]:
    with torch.inference_mode():
        per_batch = {}
        for name, fn in fns.items():  # size each batch to about budget_s / (rounds + 1)
            t0, calls = time.perf_counter(), 0
            while time.perf_counter() - t0 < budget_s / (rounds + 1) and calls < 10_000:
                fn()
                calls += 1
            per_batch[name] = max(1, calls)
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t = time.perf_counter()
                for _ in range(per_batch[name]):
                    fn()
                samples[name].append((time.perf_counter() - t) / per_batch[name])
    return {name: statistics.median(v) for name, v in samples.items()}
