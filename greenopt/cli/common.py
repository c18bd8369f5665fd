"""What every command handler shares: the consoles, progress bars and JSON output."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
# Piped output (logs, CI) gets a wide fixed width so tables are not cut to 80 columns.
out = Console() if Console().is_terminal else Console(width=200)


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator:
    """Yields a ``progress(stage, done, total)`` callback drawing one bar per stage on stderr."""
    if not enabled or not console.is_terminal:
        last: dict[str, int] = {}

        def plain(stage: str, done: int, total: int) -> None:
            if done == 0 or done == total:
                if last.get(stage) != done:
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


def add_measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="cpu", help="protocol preset: go1, cpu, quick, smoke (default: cpu)")
    p.add_argument("--prompt-tokens", type=int, help="override the preset's prompt length (tokens)")
    p.add_argument("--new-tokens", type=int, help="override the preset's generated tokens per prompt")
    p.add_argument("--trials", type=int, help="override the preset's number of trials")
    p.add_argument("--batch-size", type=int, help="generation batch size (part of the protocol id)")
    p.add_argument("--meter", default="auto", help="auto, nvml, rapl or estimate (default: auto)")
    p.add_argument("--cpu-watts", type=float, help="watts per busy core for the estimate meter")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--intensity", type=float, default=None, help="grid carbon intensity in gCO2e/kWh (default 475)")
