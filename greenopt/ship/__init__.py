"""Shipping a variant: export it as a checkpoint with its label card, export a search trial,
and gate it in CI.

Public verbs: :func:`export` (a model in memory to a folder), :func:`export_run` (a trial of a
search run), :func:`load` (an export back into the model that was measured) and :func:`verify`
(re-measure an export or recipe and fail unless it keeps its label and accuracy).
"""

from greenopt.models.checkpoint import load
from greenopt.ship.exporter import ExportProvenance, export, load_manifest
from greenopt.ship.from_run import export_run
from greenopt.ship.gate import VerifySpec, verify

__all__ = ["ExportProvenance", "VerifySpec", "export", "export_run", "load", "load_manifest", "verify"]
