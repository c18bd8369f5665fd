"""The run directory ``runs/NAME/``: layout, atomic writes, resolved spec, environment.

Layout::

    runs/NAME/
      study.db          Optuna study (sqlite), unless --storage points elsewhere
      search.yaml       the resolved SearchSpec
      environment.json  python, torch, transformers, optuna versions; device; meter
      trials/00012.json one TrialRecord per trial
      result.json       the SearchResult
      chosen.yaml       the chosen variant (absent when the target was not reached)
      pareto.png, pareto.html
"""

from __future__ import annotations

import logging
import platform
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greenopt._io import library_versions, write_text
from greenopt._version import __version__
from greenopt.config import SearchSpec, dump_yaml, load_yaml, validated
from greenopt.errors import ConfigError

log = logging.getLogger(__name__)

# Fields that may change when resuming (a longer budget, a new time limit).
RESUMABLE_CHANGES = frozenset({"n_trials", "timeout_s"})
_OWNED = ("study.db", "search.yaml", "environment.json", "trials", "result.json", "chosen.yaml",
          "pareto.png", "pareto.html")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run."""

    root: Path

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def spec(self) -> Path:
        return self.root / "search.yaml"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def chosen(self) -> Path:
        return self.root / "chosen.yaml"

    @property
    def png(self) -> Path:
        return self.root / "pareto.png"

    @property
    def html(self) -> Path:
        return self.root / "pareto.html"

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{self.study_db.resolve()}"

    def trial_path(self, number: int) -> Path:
        return self.trials / f"{number:05d}.json"


def run_dir(spec: SearchSpec) -> RunDir:
    """``<runs_dir>/<run name>`` for a spec (not created)."""
    return RunDir(Path(spec.runs_dir) / spec.run_name)


def check(spec: SearchSpec, *, resume: bool = False, force: bool = False) -> RunDir:
    """Checks, without writing anything, that the run can start or resume (see :func:`prepare`).

    Raises:
        ConfigError: the run exists and neither ``resume`` nor ``force`` was given, or
            ``resume`` found a different stored spec without ``force``.
    """
    rd = run_dir(spec)
    if not rd.spec.is_file():
        return rd
    if not resume and not force:
        raise ConfigError(f"run {rd.root} already exists; pass --resume to continue it, --force to "
                          "start it over, or choose another --name")
    if resume:
        old = validated(SearchSpec, load_yaml(rd.spec), where=str(rd.spec))
        diff = spec_diff(old, spec)
        if diff and not force:
            raise ConfigError(f"run {rd.root} was started with a different spec ({', '.join(diff)}); "
                              "resume with the same options, or pass --force to accept the change")
        if diff:
            log.warning("resuming %s with changed fields: %s", rd.root, ", ".join(diff))
    return rd


def prepare(spec: SearchSpec, *, resume: bool = False, force: bool = False) -> RunDir:
    """Creates or reopens the run directory and writes ``search.yaml``.

    Args:
        spec: the resolved search spec.
        resume: continue an existing run (its study and trial records are kept).
        force: without ``resume``, start an existing run over (greenopt's files in it are
            deleted); with ``resume``, accept a spec that differs from the stored one.

    Returns:
        The run directory.

    Raises:
        ConfigError: as :func:`check`.
    """
    rd = check(spec, resume=resume, force=force)
    if rd.spec.is_file() and not resume:
        _wipe(rd)
    rd.trials.mkdir(parents=True, exist_ok=True)
    write_text(rd.spec, dump_yaml(spec))
    return rd


def spec_diff(old: SearchSpec, new: SearchSpec) -> list[str]:
    """Dotted paths of fields that differ, ignoring those a resume may change."""
    return [p for p in _diff(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
            if p not in RESUMABLE_CHANGES]


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [path]


def _wipe(rd: RunDir) -> None:
    for name in _OWNED:
        p = rd.root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Library versions, host and python, plus ``extra`` (device, meter) from the runner."""
    versions = {"greenopt": __version__, **library_versions()}
    return {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
            "versions": versions, **(extra or {})}
