"""What every command handler shares: the consoles, progress bars and JSON output."""

from __future__ import annotations

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
