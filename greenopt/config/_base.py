"""Shared machinery of every input: the frozen base model and the YAML/JSON loaders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from greenopt.errors import ConfigError


class Strict(BaseModel):
    """Base for every input: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _path_of(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def validated(model: type[Strict], data: Any, where: str = "") -> Any:
    """Validates ``data`` into ``model``; raises ConfigError naming the first bad field path."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        prefix = f"{where}: " if where else ""
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{prefix}{_path_of(err['loc'])}: {err['msg']}{more}") from None


def read_text(path: str | Path) -> str:
    """Reads a UTF-8 text input (a leading BOM is dropped).

    Raises:
        ConfigError: the file is missing, a folder, unreadable, or not UTF-8 text.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a file; pass the file itself")
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({(e.strerror or str(e)).lower()}); check its permissions") from None


def load_yaml(path: str | Path) -> Any:
    """Reads a YAML file; raises ConfigError for missing, unreadable, non-UTF-8 or malformed files."""
    p = Path(path)
    text = read_text(p)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{at}") from None


def load_json(path: str | Path, model: type[BaseModel]) -> Any:
    """Reads a JSON file into a validated ``model``; ConfigError on an unreadable file, bad JSON or fields."""
    p = Path(path)
    text = read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON at line {e.lineno}") from None
    return validated(model, data, where=str(p))  # type: ignore[arg-type]


def dump_yaml(obj: Strict) -> str:
    """Serialises an input model to YAML that loads back to an equal object."""
    return yaml.safe_dump(obj.model_dump(mode="json"), sort_keys=False)
