"""Checks of a model folder before anything loads it: JSON that parses, weights that exist,
safetensors whose header fits the file. One ModelError line naming the file and the fix."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from greenopt.errors import ModelError

MODULES = "greenopt_modules.json"  # a greenopt-loader export's module map
WEIGHTS = "greenopt-model.safetensors"  # its weights (a name transformers does not read)


_EXPORT_MANIFEST = "greenopt_export.json"  # greenopt.ship.exporter.MANIFEST (ship sits above models)


# transformers' own order of preference among a folder's weight files.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def check_folder(folder: Path, fix: str | None = None) -> None:
    """Checks a checkpoint folder's files without loading tensors: JSON parses, weights exist and are whole.

    Reads ``config.json``, the greenopt manifest or sharded index if any, and each safetensors
    header, comparing the size its tensors need with the file's size.

    Args:
        folder: a transformers checkpoint folder or a greenopt export folder.
        fix: the remedy to name in errors (default: re-download, or re-export for an export).

    Raises:
        ModelError: one line naming the damaged or missing file and the remedy.
    """
    folder = Path(folder)
    fix = fix or _remedy(folder)
    if (folder / "genai_config.json").is_file() and not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: an ONNX Runtime GenAI model, not a checkpoint; load it with "
                         "onnxruntime_genai.Model(DIR), or measure it with greenopt verify DIR")
    if (folder / "model.gguf").is_file() and not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: a llama.cpp export (model.gguf), not a checkpoint; load it with "
                         "llama_cpp.Llama(model_path='DIR/model.gguf'), or measure it with greenopt verify DIR")
    _json_object(folder / "config.json", fix)
    if (folder / MODULES).is_file():
        _json_object(folder / MODULES, fix)
        if not (folder / WEIGHTS).is_file():
            raise ModelError(f"{folder}: export has {MODULES} but no weights ({WEIGHTS} is missing); {fix}")
        weights = [folder / WEIGHTS]
    else:
        weights = _weight_files(folder, fix)
    for f in weights:
        if f.suffix == ".safetensors":
            _check_safetensors(f, fix)


def _remedy(folder: Path) -> str:
    if (folder / MODULES).is_file() or (folder / _EXPORT_MANIFEST).is_file():
        return "re-export it (greenopt export / greenopt apply)"
    return "re-download or re-save the model"


def _reconvert(folder: Path) -> str:
    return f"delete {folder} and greenopt converts the GGUF again"


def _json_object(path: Path, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not valid JSON (not UTF-8 text); {fix}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a JSON object; {fix}")
    return data


def _weight_files(folder: Path, fix: str) -> list[Path]:
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = _json_object(path, fix).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{path}: sharded index has no weight_map; {fix}")
        shards = [folder / s for s in sorted(set(map(str, weight_map.values())))]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise ModelError(f"{missing[0]}: shard listed in {name} is missing; {fix}")
        return shards
    raise ModelError(f"{folder}: no weights (no model.safetensors, sharded index or pytorch_model.bin); {fix}")


def _check_safetensors(path: Path, fix: str) -> None:
    problem = _safetensors_problem(path)
    if problem:
        raise ModelError(f"{path}: truncated or corrupt safetensors file ({problem}); {fix}")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout (8-byte length, JSON header, tensor bytes), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            return f"header says {n} bytes, the file has {size}"
        head = f.read(n)
    try:
        header = json.loads(head)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "unreadable header"
    need = 8 + n + max(ends, default=0)
    if need != size:
        return f"tensors need {need} bytes, the file has {size}"
    return None
