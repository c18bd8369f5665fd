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


def load_yaml(path: str | Path) -> Any:
    """Reads a YAML file; raises ConfigError for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{at}") from None


def load_json(path: str | Path, model: type[BaseModel]) -> Any:
    """Reads a JSON file into a validated ``model``; ConfigError on bad JSON or fields."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON at line {e.lineno}") from None
    return validated(model, data, where=str(p))  # type: ignore[arg-type]


def dump_yaml(obj: Strict) -> str:
    """Serialises an input model to YAML that loads back to an equal object."""
    return yaml.safe_dump(obj.model_dump(mode="json"), sort_keys=False)
