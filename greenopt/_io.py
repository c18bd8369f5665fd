"""Atomic file writes and library versions: the one copy every room uses."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from greenopt.errors import WriteError

#: Distributions whose versions greenopt records in run folders, cards and export manifests.
LIBRARIES = ("torch", "transformers", "safetensors", "bitsandbytes", "hqq", "torchao", "optuna", "lm-eval",
             "numpy", "pydantic")


def write_bytes(path: str | Path, payload: bytes) -> None:
    """Writes ``payload`` atomically: a temp file in the same folder, fsync, then ``os.replace``.

    The file is world-readable (0644; mkstemp's 0600 would hide shared caches, cards and
    exports from other users). A failure leaves the old file, or none, never a half-written one.

    Raises:
        WriteError: the folder or file cannot be written (read-only, no permission, disk full,
            a part of the path is a file); the message names the path and the reason.
    """
    path = Path(path)
    tmp = _staged(path, payload)
    try:
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e) from None


def write_texts(files: dict[Path, str]) -> None:
    """Writes several text files as one set: every temp file is written and synced first, then
    all are put in place. A failure while writing (disk full, read-only) leaves every old file,
    or none, and no temp file; the renames that follow allocate no space.

    Raises:
        WriteError: as :func:`write_bytes`, naming the file that could not be written.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            staged.append((_staged(Path(path), text.encode("utf-8")), Path(path)))
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise _write_error(path, e) from None
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)


def _staged(path: Path, payload: bytes) -> str:
    """A synced, world-readable temp file beside ``path`` holding ``payload``; its name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o644)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    return tmp


def _write_error(path: str | Path, e: OSError) -> WriteError:
    """The :class:`WriteError` for an OSError met while writing ``path``."""
    reason = (e.strerror or str(e)).lower()
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "free some space or choose another output folder"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "a part of the path is a file; choose another output folder"
    else:
        fix = "choose a writable output folder"
    err = WriteError(f"cannot write {path}: {reason}; {fix}")
    err.errno = e.errno
    return err


def write_text(path: str | Path, text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write; pydantic models are dumped in JSON mode."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def version(dist: str) -> str:
    """The installed version of ``dist``, or ``"not installed"``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions(dists: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """``{dist: version}`` for ``dists`` (default: :data:`LIBRARIES`)."""
    return {d: version(d) for d in dists}
