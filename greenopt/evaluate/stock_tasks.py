"""lm-eval's own (stock) tasks: their names, and whether their data is on this machine.

greenopt runs every task with the Hugging Face hub offline. A stock task (``mmlu``,
``winogrande``, ...) reads a hub dataset, so it is usable only when that dataset was prepared
before in the local datasets cache (:mod:`greenopt.evaluate.offline_data`).
:func:`check_offline` walks a task, group or tag down to its leaf tasks and refuses, in one
line, the first whose dataset would need the network, before any model work.

Example:
    >>> from greenopt.evaluate.stock_tasks import check_offline
    >>> check_offline("mmlu")                    # doctest: +SKIP
    Traceback (most recent call last):
    greenopt.errors.ConfigError: task 'mmlu' (subtask mmlu_abstract_algebra) needs the hub dataset cais/mmlu ...
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from typing import Any

from greenopt._io import write_text
from greenopt.errors import ConfigError
from greenopt.evaluate.offline_data import datasets_cache, packaged_builders, probe
from greenopt.evaluate.tasks import OFFLINE_TASKS, evals_home

log = logging.getLogger(__name__)

_MAX_DEPTH = 16  # groups of groups; deeper is a cycle


def offline_hint() -> str:
    """How to fix a task that needs the network: the offline tasks, or the user's own."""
    return (f"use an offline task ({', '.join(OFFLINE_TASKS)}) or your own task on local data "
            "(--include-path DIR; docs/EVALUATION.md)")


@functools.lru_cache(maxsize=1)
def stock_task_names() -> frozenset[str]:
    """Every task, group and tag name lm-eval knows, cached in ``$GREENOPT_HOME/evals/`` per version."""
    from importlib.metadata import version

    cache = evals_home() / f"lm_eval-{version('lm_eval')}-task-names.json"
    try:
        return frozenset(json.loads(cache.read_text()))
    except (OSError, ValueError):
        names = stock_task_manager().all_tasks
        write_text(cache, json.dumps(sorted(names)) + "\n")
        return frozenset(names)


@functools.lru_cache(maxsize=1)
def stock_task_manager() -> Any:
    """lm-eval's TaskManager over its stock tasks (builds its index once: about 10 s)."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from lm_eval.tasks import TaskManager

    return TaskManager()


def check_offline(name: str) -> tuple[str, ...]:
    """Checks that every dataset stock task ``name`` reads loads with the hub offline.

    Args:
        name: a stock lm-eval task, group or tag name.

    Returns:
        Where each leaf's data was found (the prepared cache folders), for cache keys.

    Raises:
        ConfigError: a leaf task whose data is not on this machine (not in the local datasets
            cache, or data files at a URL), or one greenopt cannot check (defined in Python).
    """
    found = []
    for leaf, cfg in leaf_configs(name):
        where = f"task {name!r}" if leaf == name else f"task {name!r} (subtask {leaf})"
        if "class" in cfg or "custom_dataset" in cfg:
            raise ConfigError(f"{where} is defined in Python, so greenopt cannot tell whether its data is on "
                              f"this machine; greenopt runs offline: {offline_hint()}")
        path = cfg.get("dataset_path")
        if not path:
            raise ConfigError(f"{where} names no dataset_path; {offline_hint()}")
        kwargs = json.dumps(cfg.get("dataset_kwargs") or {}, sort_keys=True, default=str)
        cache_dir, why = _probe(str(path), cfg.get("dataset_name"), kwargs)
        if why is not None:
            raise ConfigError(f"{where} {_needs(str(path), cfg.get('dataset_name'), why)}; "
                              f"greenopt runs offline: {offline_hint()}")
        found.append(cache_dir or "")
    return tuple(found)


def leaf_configs(name: str) -> list[tuple[str, dict[str, Any]]]:
    """The leaf tasks of a stock task, group or tag, each with its config (functions unresolved)."""
    return list(_leaves(name, stock_task_manager().task_index, {}, 0))


def _needs(path: str, name: str | None, why: str) -> str:
    if path in packaged_builders():
        return f"reads data files that are not on this machine ({why})"
    what = f"{path} ({name})" if name else path
    return f"needs the hub dataset {what}, which is not in the local datasets cache ({datasets_cache()})"


_FOUND: dict[tuple[str, str, str | None, str], str] = {}  # datasets found offline (misses are asked again)


def _probe(path: str, name: str | None, kwargs_json: str) -> tuple[str | None, str | None]:
    key = (datasets_cache(), path, name, kwargs_json)
    if key in _FOUND:
        return _FOUND[key], None
    found, why = probe(path, name, json.loads(kwargs_json))
    if found is not None:
        _FOUND[key] = found
    return found, why


def _leaves(item: Any, index: dict[str, Any], overrides: dict[str, Any], depth: int) -> Iterator[tuple[str, dict]]:
    if depth > _MAX_DEPTH:
        raise ConfigError(f"lm-eval task {item!r}: groups nest deeper than {_MAX_DEPTH} (a cycle?)")
    if isinstance(item, dict):
        ref = item.get("group", item.get("task"))
        extra = {k: v for k, v in item.items() if k not in ("group", "task")}
        if ref in index:
            yield from _leaves(ref, index, {**overrides, **extra}, depth + 1)
        elif "group" in item:  # an inline group: its own member list
            yield from _members(item, index, overrides, depth)
        else:  # an inline task
            yield str(ref), {**overrides, **item}
        return
    entry = index.get(item)
    if entry is None:
        yield str(item), dict(overrides)
        return
    kind = entry.kind.name
    if kind == "TAG":
        for task in sorted(entry.tags):
            yield from _leaves(task, index, overrides, depth + 1)
    elif kind == "GROUP":
        yield from _members(entry.cfg or {}, index, overrides, depth)
    else:
        yield entry.name, {**(entry.cfg or {}), **overrides}


def _members(group: dict[str, Any], index: dict[str, Any], overrides: dict[str, Any],
             depth: int) -> Iterator[tuple[str, dict]]:
    from lm_eval.tasks._factory import GROUP_FIELD_NAMES

    # lm-eval merges a group's task-level keys under the caller's overrides
    merged = {**{k: v for k, v in group.items() if k not in GROUP_FIELD_NAMES}, **overrides}
    members = group.get("task") or []
    for member in members if isinstance(members, list) else [members]:
        yield from _leaves(member, index, merged, depth + 1)
