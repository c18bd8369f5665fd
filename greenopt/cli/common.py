"""What every command handler shares: the consoles, progress bars, JSON output, the argparse
types that refuse bad numbers before any work, and the check that an output folder is writable."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from greenopt.config import RUNTIME_EXTRAS, RUNTIME_WEIGHTS, Deploy, Variant, validated
from greenopt.errors import ConfigError, GreenoptError
from greenopt.label.card import write_card

#: The most energy-protocol trials a command line may ask for (the presets use 5).
MAX_PROTOCOL_TRIALS = 1000

console = Console(stderr=True)
# Piped output (logs, CI) gets a wide fixed width so tables are not cut to 80 columns.
out = Console() if Console().is_terminal else Console(width=200)


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator:
    """Yields a ``progress(stage, done, total)`` callback drawing one bar per stage on stderr
    (plain lines when stderr is not a terminal; nothing when not ``enabled``, as for ``--json``)."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    if not console.is_terminal:
        last: dict[str, int] = {}

        def plain(stage: str, done: int, total: int) -> None:
            if (done == 0 or done == total) and last.get(stage) != done:
                console.print(f"[dim]{stage}: {done}/{total}[/dim]")
                last[stage] = done

        yield plain
        return
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=max(total, 1))
            bars.update(tasks[stage], completed=done, total=max(total, 1))

        yield update


def emit_json(obj) -> None:
    """Prints a JSON document to stdout (the ``--json`` output of every command)."""
    print(json.dumps(obj, indent=2, default=str))


def whole(lo: int, hi: int | None = None, note: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from ``lo`` to ``hi`` (None: no upper limit).

    ``note`` follows the allowed range in the message, e.g. ``" (0 = full sets)"``.
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            allowed = f"{lo} to {hi}" if hi is not None else f"{lo} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range; pass {allowed}{note}")
        return value

    parse.__name__ = "whole number"  # argparse's fallback message names the type
    return parse


def real(lo: float, *, above: bool = False, note: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number ``>= lo`` (``> lo`` when ``above``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < lo or (above and value == lo):
            allowed = f"a finite number {'above' if above else 'of at least'} {lo:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range; pass {allowed}{note}")
        return value

    parse.__name__ = "number"
    return parse


#: torch CPU threads: at least one (1024 is more than any CPU has).
thread_count = whole(1, 1024, " (or leave --threads out for torch's choice)")


def check_writable(path: str | Path, flag: str) -> None:
    """Fails before any model work when the folder ``path`` cannot be created or written.

    Checks ``path`` when it exists, else the nearest folder above it that does. As root a
    permission check passes, so the writers themselves (:mod:`greenopt._io`) still turn a
    failed write into one line.

    Raises:
        ConfigError: ``path`` (or a part of it) is a file, or the folder is read-only or not
            writable by this user.
    """
    p = Path(path)
    base = p
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{flag} {path}: {base} is a file, not a folder; choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {base} ({_why_not_writable(base)}); "
                          f"choose a writable {flag}")


def write_card_folder(card, out_dir: str | Path) -> dict[str, Path]:
    """:func:`~greenopt.label.card.write_card`, removing a folder it created when a write fails."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        return write_card(card, out_dir)
    except (GreenoptError, OSError):
        if created:  # no half a card left behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _why_not_writable(folder: Path) -> str:
    if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:
        return "read-only file system"
    return "permission denied"


def add_measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="cpu", help="protocol preset: go1, cpu, quick, smoke (default: cpu)")
    p.add_argument("--prompt-tokens", type=int, help="override the preset's prompt length (tokens)")
    p.add_argument("--new-tokens", type=int, help="override the preset's generated tokens per prompt")
    p.add_argument("--trials", type=whole(1, MAX_PROTOCOL_TRIALS), help="override the preset's number of trials")
    p.add_argument("--batch-size", type=int, help="generation batch size (part of the protocol id)")
    p.add_argument("--meter", default="auto", help="auto, nvml, rapl or estimate (default: auto)")
    p.add_argument("--cpu-watts", type=real(0, above=True), help="watts per busy core for the estimate meter")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16, float16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--intensity", type=real(0), default=None,
                   help="grid carbon intensity in gCO2e/kWh, 0 or more (default 475)")


def add_include_path(p) -> None:
    """``--include-path DIR``: the user's own lm-eval task YAMLs, named then in ``--tasks``."""
    p.add_argument("--include-path", metavar="DIR", type=_folder_path,
                   help="a folder of your own lm-eval task YAMLs with local data; name its tasks in --tasks "
                        "(docs/EVALUATION.md)")


def _folder_path(text: str) -> str:
    """An absolute path (records name the folder wherever the run is resumed or verified from)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; pass the folder holding your task YAML files")
    return str(Path(text).expanduser().resolve())


def add_deploy_args(p) -> None:
    """``--runtime``, ``--runtime-dtype``, ``--runtime-weights``, ``--block-size``, ``--accuracy-level``,
    ``--compile``."""
    g = p.add_argument_group("deployment (the runtime the variant is measured and scored on)")
    g.add_argument("--runtime", choices=tuple(RUNTIME_EXTRAS), help="runtime (default: transformers, the reference)")
    g.add_argument("--runtime-dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype on that runtime (default: the dtype the model is loaded in)")
    formats = ("dense", *dict.fromkeys(f for fs in RUNTIME_WEIGHTS.values() for f in fs))
    g.add_argument("--runtime-weights", choices=formats, metavar="FORMAT",
                   help="the runtime's own weight format: dense; onnxruntime-genai MatMulNBits int8, int4; "
                        "llama.cpp " + ", ".join(RUNTIME_WEIGHTS["llama.cpp"]))
    g.add_argument("--block-size", type=int, choices=(16, 32, 64, 128, 256), help="MatMulNBits block size")
    g.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4),
                   help="MatMulNBits accuracy level (4: int8 activations)")
    g.add_argument("--compile", action="store_const", const=True, default=None,
                   help="transformers: static KV cache and torch.compile of the decode step (compile time "
                        "reported apart from the measurement)")


def with_deploy(variant: Variant, args) -> Variant:
    """The variant with the deployment the flags ask for (a variant file's own ``deploy`` if none is given)."""
    fields = {"runtime": args.runtime, "dtype": args.runtime_dtype, "weights": args.runtime_weights,
              "block_size": args.block_size, "accuracy_level": args.accuracy_level, "compile": args.compile}
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return variant
    if not variant.deploy.is_reference:
        raise ConfigError("the variant file already sets deploy:; drop --runtime* flags or the file's deploy: block")
    deploy = validated(Deploy, given, where="--runtime flags")
    return variant.model_copy(update={"deploy": deploy})
