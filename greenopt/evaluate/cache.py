"""The baseline's accuracy, scored once per model, item set and scorer, and kept on disk.

Every ``greenopt measure`` of a variant scores the same unmodified baseline on the same
items; :func:`baseline_eval` stores that :class:`~greenopt.records.EvalResult` as JSON under
``$GREENOPT_HOME/evals/baselines/<sha256>.json`` and reads it back on the next call with the
same key. The key is the caller's model identity (:func:`model_key`: id, source, dtype,
device and the size and mtime of each of the model's files, so an edited checkpoint is scored
afresh) plus everything that changes the scores (:func:`eval_key`): the whole
:class:`~greenopt.config.EvalSpec` (tasks, limit, seed, few-shot count, batch size, include
path), the contents of the user's task files and data, the offline tasks' data fingerprint,
where a stock task's data was found, whether per-item values are kept, the versions of
lm-eval, datasets, transformers and torch, the source of greenopt's scorer
(``greenopt/evaluate/*.py``) and the ``GREENOPT_EVAL*`` variables that choose how it scores
(such as ``GREENOPT_EVAL_LM``). A hit is logged at INFO and the result says ``cached=True``.
A corrupted file is ignored with a warning, recomputed and overwritten.
``GREENOPT_EVAL_CACHE=0`` turns the cache off.

Only an unmodified model loaded from its files may be keyed this way: a compressed variant
in memory has no files that say what it is.

Example:
    >>> from greenopt.evaluate.cache import baseline_eval, model_key
    >>> model, tok, info = load_model("default")                               # doctest: +SKIP
    >>> key = model_key(info, "float32", "cpu")                                # doctest: +SKIP
    >>> baseline_eval(model, tok, EvalSpec(), key=key).cached                  # doctest: +SKIP
    False
    >>> baseline_eval(model, tok, EvalSpec(), key=key).cached                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from greenopt._io import version, write_json
from greenopt.config import EvalSpec
from greenopt.errors import WriteError
from greenopt.evaluate import (
    Progress,
    evaluate,
    stock_tasks,
    user_tasks,
    validate_tasks,
)
from greenopt.evaluate.tasks import OFFLINE_TASKS, data_fingerprint, evals_home
from greenopt.records import EvalResult, ModelInfo

__all__ = ["ENV", "baseline_eval", "cache_dir", "enabled", "eval_key", "model_key"]

log = logging.getLogger(__name__)

#: Set to ``0`` to turn the baseline cache off.
ENV = "GREENOPT_EVAL_CACHE"
_FORMAT = 1  # bump when the stored layout or the meaning of a key part changes
_LIBRARIES = ("lm_eval", "datasets", "transformers", "torch")


def enabled() -> bool:
    """Whether the cache is on (``GREENOPT_EVAL_CACHE`` is not ``0``)."""
    return os.environ.get(ENV, "1").strip() != "0"


def cache_dir() -> Path:
    """Where cached baseline results live: ``$GREENOPT_HOME/evals/baselines``."""
    return evals_home() / "baselines"


def model_key(info: ModelInfo, dtype: str, device: str) -> str | None:
    """The identity of an unmodified model loaded from its files, for :func:`baseline_eval`.

    Args:
        info: what :func:`greenopt.models.load_model` returned for it.
        dtype: the dtype it was loaded in (``float32``, ``bfloat16``, ...).
        device: where it runs (``cpu``, ``cuda:0``, ...).

    Returns:
        A key naming the model, its dtype, device, parameter count and a fingerprint of its
        files (path, size and mtime of each; cheap, and changed by any edit), or None when its
        files cannot be found (a hub model not in the local hub cache): then nothing is cached.
    """
    folder = _model_folder(info)
    if folder is None:
        return None
    files = sorted((str(p.relative_to(folder)) if folder.is_dir() else p.name, p.stat().st_size,
                    p.stat().st_mtime_ns) for p in _files(folder))
    if not files:
        return None
    h = hashlib.sha256(json.dumps([str(folder.resolve()), files]).encode()).hexdigest()
    return json.dumps({"model_id": info.model_id, "source": info.source, "num_params": info.num_params,
                       "dtype": str(dtype), "device": str(device), "files": h}, sort_keys=True)


def eval_key(spec: EvalSpec, *, model: str, keep_items: bool = False) -> dict[str, Any]:
    """Everything a cached baseline result depends on (its SHA-256 names the file).

    Validates the tasks first (:func:`greenopt.evaluate.validate_tasks`).

    Args:
        spec: the tasks and item set.
        model: the model's identity (:func:`model_key`).
        keep_items: whether per-item values are kept.

    Returns:
        A JSON-ready mapping: format, model, spec (include path made absolute), the user
        tasks' content fingerprint, the offline data fingerprint, the stock tasks' data
        folders, keep_items, library versions, the scorer's source hash and the
        ``GREENOPT_EVAL*`` settings that choose how it scores.
    """
    names = validate_tasks(spec.tasks, spec.include_path)
    include = str(Path(spec.include_path).expanduser().resolve()) if spec.include_path else None
    own = user_tasks.load_tasks(include) if include else {}
    stock = {n: list(stock_tasks.check_offline(n)) for n in names if n not in OFFLINE_TASKS and n not in own}
    return {
        "format": _FORMAT, "model": model,
        "spec": {**spec.model_dump(mode="json"), "include_path": include},
        "user_tasks": user_tasks.fingerprint(include) if own else None,
        "offline_data": data_fingerprint() if any(n in OFFLINE_TASKS for n in names) else None,
        "stock_data": stock, "keep_items": keep_items,
        "libraries": {d: version(d) for d in _LIBRARIES}, "scorer": _scorer_hash(),
        "scorer_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("GREENOPT_EVAL") and k != ENV},
    }


def baseline_eval(model: Any, tokenizer: Any, spec: EvalSpec, *, key: str | None,
                  progress: Progress | None = None, keep_items: bool = False) -> EvalResult:
    """:func:`greenopt.evaluate.evaluate` of an unmodified baseline, read from the cache when it was scored before.

    Args:
        model: the baseline as loaded (a ``transformers`` causal LM), not compressed or edited
            in memory: the key says which files it came from, nothing about in-memory changes.
        tokenizer: its tokenizer.
        spec: tasks and item set, as for ``evaluate``.
        key: the model's identity, :func:`model_key` (None: no identity, so score it and cache nothing).
        progress: ``progress(task, done, total)``, called only when the model is scored.
        keep_items: keep per-item values (``TaskScore.items``); part of the key.

    Returns:
        The result; ``cached=True`` when it was read from the cache.

    Raises:
        ConfigError: an unknown or malformed task (before any model work).
    """
    if key is None or not enabled():
        return evaluate(model, tokenizer, spec, progress=progress, keep_items=keep_items)
    doc = eval_key(spec, model=key, keep_items=keep_items)
    path = cache_dir() / f"{hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()}.json"
    hit = _read(path, doc)
    if hit is not None:
        log.info("baseline accuracy read from the cache (%s; GREENOPT_EVAL_CACHE=0 re-scores it)", path)
        return hit
    result = evaluate(model, tokenizer, spec, progress=progress, keep_items=keep_items)
    try:
        write_json(path, {"key": doc, "result": result.model_dump(mode="json")})
    except WriteError as e:  # the scores stand; only the next run's saving is lost
        log.warning("baseline accuracy not cached: %s", e)
    return result


def _read(path: Path, doc: dict[str, Any]) -> EvalResult | None:
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["key"] != json.loads(json.dumps(doc)):
            raise ValueError("its key does not match its name")
        result = EvalResult.model_validate(stored["result"])
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as e:
        log.warning("ignoring the damaged cached baseline result %s (%s); scoring the baseline again",
                    path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return result.model_copy(update={"cached": True})


def _model_folder(info: ModelInfo) -> Path | None:
    if info.source != "hub":
        p = Path(info.path)
        return p if p.exists() else None
    from huggingface_hub import try_to_load_from_cache  # lazy: hub models only

    try:
        config = try_to_load_from_cache(info.path, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


def _files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    return [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                     p.relative_to(folder).parts)]


def _scorer_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
