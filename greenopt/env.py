"""Facts about this machine that every room agrees on: which device, which dtype, which CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from greenopt.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> (kind, index); ``auto`` picks CUDA when present.

    Checks the spelling only; :func:`resolve_device` also checks that CUDA is there.

    Raises:
        ConfigError: an unknown device.
    """
    if device == "auto":
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu"), 0
    kind, _, idx = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()) or (kind == "cpu" and idx):
        raise ConfigError(f"--device {device}: use cpu, cuda, cuda:N or auto")
    return kind, int(idx) if idx else 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is checked and kept.

    Raises:
        ConfigError: an unknown device, or CUDA asked for on a machine without it.
    """
    import torch

    kind, _ = parse_device(device)
    if device == "auto":
        return kind
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def set_threads(threads: int | None) -> None:
    """Pins torch's CPU threads (intra-op) to ``threads``; None leaves torch's own choice.

    Raises:
        ConfigError: fewer than one thread.
    """
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"threads: {threads} is not a thread count; pass 1 or more (or leave it out)")
    import torch  # lazy: torch loads only where a model runs

    torch.set_num_threads(threads)


def resolve_dtype(dtype: str | None, device: str) -> str:
    """The ``auto`` dtype rule: bfloat16 on CUDA, float32 on CPU; an explicit dtype is checked and kept.

    Raises:
        ConfigError: a dtype greenopt does not load models in.
    """
    if dtype in (None, "auto"):
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return dtype


_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile",
                      "avx512_fp16", "asimd", "sve", "bf16")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> tuple[str, ...]:
    """The vector-ISA flags that change which kernels are fast (AVX2, AVX-512 BF16/VNNI, AMX...)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in _FLAGS_OF_INTEREST if f in have)
    return ()


def machine() -> str:
    """A readable name for this machine: host, CPU model and logical cores."""
    return f"{platform.node() or 'unknown-host'} / {cpu_model()} / {os.cpu_count()} cores"


def cpu_has_bf16(flags: tuple[str, ...] | None = None) -> bool:
    """True when the CPU computes bfloat16 natively (AVX-512 BF16, AMX BF16, or Arm BF16)."""
    have = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(have))


def cpu_has_fp16(flags: tuple[str, ...] | None = None) -> bool:
    """True when the CPU computes float16 natively (AVX-512 FP16; Arm's asimd half precision is not counted)."""
    have = cpu_flags() if flags is None else flags
    return "avx512_fp16" in have
