"""Facts about this machine that every room agrees on: which device, which dtype."""

from __future__ import annotations

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
