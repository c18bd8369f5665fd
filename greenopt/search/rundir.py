"""The run directory ``runs/NAME/``: layout, atomic writes, resolved spec, environment.

Layout::

    runs/NAME/
      .lock             held (flock) by the one search process running it: pid, host, start
      study.db          Optuna study (sqlite), unless --storage points elsewhere
      search.yaml       the resolved SearchSpec
      environment.json  python, torch, transformers, optuna versions; device; meter
      trials/00012.json one TrialRecord per trial, written once the study holds its result
      result.json       the SearchResult
      chosen.yaml       the chosen variant (absent when the target was not reached)
      pareto.png, pareto.html
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

from greenopt._io import library_versions, write_text
from greenopt._version import __version__
from greenopt.config import SearchSpec, dump_yaml, load_yaml, validated
from greenopt.errors import ConfigError

log = logging.getLogger(__name__)

# Fields that may change when resuming (a longer budget, a new time limit).
RESUMABLE_CHANGES = frozenset({"n_trials", "timeout_s"})
_OWNED = ("study.db", "search.yaml", "environment.json", "trials", "result.json", "chosen.yaml",
          "pareto.png", "pareto.html", "kernels.json")


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
    def kernels(self) -> Path:
        return self.root / "kernels.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def sqlite_url(self) -> str:
        """The study's sqlite URL, its path percent-encoded (a folder may hold ``?``, ``#``, ``%``, braces)."""
        return sqlalchemy.engine.URL.create("sqlite", database=str(self.study_db.resolve())).render_as_string()

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
    make_dirs(rd)
    write_text(rd.spec, dump_yaml(spec))
    return rd


def make_dirs(rd: RunDir) -> None:
    """Creates ``rd.trials`` (and the run folder).

    Raises:
        ConfigError: the runs dir, the run folder or ``trials`` is a file, or cannot be created.
    """
    _mkdir(rd, rd.trials)


def _mkdir(rd: RunDir, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        if blocker == rd.root:
            what, fix = "the run folder", "move it away or pass another --name"
        elif blocker in (rd.root.parent, *rd.root.parent.parents):
            what, fix = "the runs dir", "move it away or pass another --runs-dir"
        else:
            what, fix = "a path in the run folder", "move it away"
        raise ConfigError(f"{what} {blocker} is a file, not a folder; {fix}") from e
    except PermissionError as e:
        raise ConfigError(f"cannot create {folder} (permission denied); pass a writable --runs-dir") from e


@contextlib.contextmanager
def locked(rd: RunDir) -> Iterator[RunDir]:
    """Holds ``rd.lock`` for one search process, creating the run folder if needed.

    The lock is an ``flock`` on the open file, so a killed process releases it and a stale
    file is taken over silently; the file records the holder's pid, host and start time for
    the refusal. On leaving (an exception and Ctrl-C included) the file is removed, and a run
    folder this call created is removed too if nothing else was written in it.

    Raises:
        ConfigError: another live process holds the run, or the run folder cannot be created.
    """
    created = not rd.root.is_dir()
    _mkdir(rd, rd.root)
    fd = _acquire(rd)
    try:
        yield rd
    finally:
        _release(rd, fd, created)


def _acquire(rd: RunDir) -> int | None:
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(rd.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as e:
            raise ConfigError(f"cannot write in run folder {rd.root} (permission denied); pass a writable "
                              "--runs-dir") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"run {rd.root} is in use by {holder}; wait for it, or add workers through "
                              "shared storage (greenopt worker)") from None
        except OSError as e:  # a filesystem without locks (some network mounts): run unlocked, say so
            log.warning("cannot lock %s (%s); make sure no other search uses this run", rd.lock, e)
            return fd
        except BaseException:
            os.close(fd)
            raise
        try:  # the last holder removes the file on release: a lock on a removed file locks nothing
            current = os.stat(rd.lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    return fd


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {int(info['pid'])} on {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _release(rd: RunDir, fd: int | None, created: bool) -> None:
    try:
        rd.lock.unlink(missing_ok=True)  # while still held, so a waiting opener sees it is gone
    finally:
        if fd is not None:
            os.close(fd)  # closing the file releases the flock
    if created:
        with contextlib.suppress(OSError):
            rd.root.rmdir()  # only when empty: the run never got as far as writing anything


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
