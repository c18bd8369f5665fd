"""Subcommands beyond measure: search, worker, apply, export, verify, label, recipe."""

from __future__ import annotations

HANDLERS: dict = {}


def add_parsers(sub, add_measure_args) -> None:
    """Adds the remaining subcommands to the parser tree."""
