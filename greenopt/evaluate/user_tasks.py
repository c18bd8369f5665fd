"""The user's own lm-eval tasks (``--include-path DIR``), checked and made to run offline.

Every ``*.yaml`` under the folder (``__pycache__`` and dot folders left out) is one lm-eval
task config: ``task: NAME``, ``output_type``, ``test_split`` or ``validation_split``, the
prompt fields, and local data. A shared base that others ``include:`` must not end in
``.yaml`` (lm-eval's own convention: ``_default_template_yaml``). The data is local: a
packaged builder with files (``dataset_path: json`` + ``dataset_kwargs: {data_files: ...}``),
a local folder, or a hub dataset already prepared in the local datasets cache. Relative data
paths are resolved against the folder of the task's YAML file. ``!function mod.fn`` imports
``mod.py`` beside the YAML (or an installed module), as lm-eval does.

:func:`load_tasks` checks every file, without loading data, and gives one line naming the
file and the field for the first problem; :func:`check_task` then loads one task's data and
renders its first item, so a wrong column name fails before any model work too.

Example:
    >>> from greenopt.evaluate.user_tasks import load_tasks
    >>> sorted(load_tasks("my_tasks"))                        # doctest: +SKIP
    ['my_qa']
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import hashlib
import logging
import re
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from greenopt.errors import ConfigError
from greenopt.evaluate.offline_data import hub_offline, packaged_builders, probe
from greenopt.evaluate.tasks import OFFLINE_TASKS

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
_STRUCTURAL = frozenset({"tag", "task_list"})  # keys lm-eval strips before building a task
_SKIP_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# the lm-eval frame a task's build failed in -> the field to blame
_FRAME_FIELDS = {"doc_to_text": "doc_to_text", "doc_to_target": "doc_to_target", "doc_to_choice": "doc_to_choice",
                 "get_metric": "metric_list", "get_aggregation": "metric_list",
                 "build_filter_ensemble": "filter_list", "download": "dataset_path",
                 "test_docs": "test_split", "validation_docs": "validation_split", "fewshot_docs": "fewshot_split"}


@dataclasses.dataclass(frozen=True)
class UserTask:
    """One checked task: its name, the YAML it is defined in, its runnable config and local data."""

    name: str
    file: Path
    config: dict[str, Any]  # functions imported, data paths absolute: ``TaskManager.load([config])``
    data: tuple[Path, ...]  # the local data files and folders it reads


class _Bad(Exception):
    def __init__(self, file: Path, field: str | None, message: str) -> None:
        super().__init__(f"{file}: field '{field}': {message}" if field else f"{file}: {message}")


@dataclasses.dataclass(frozen=True)
class _Function:
    """A ``!function`` tag, kept unresolved until its field path is known."""

    spec: str
    base_dir: Path


def load_tasks(include_path: str | Path) -> dict[str, UserTask]:
    """Every task in the user's task folder, checked; cached until a file there changes.

    Args:
        include_path: the folder of task YAMLs (``EvalSpec.include_path``).

    Returns:
        ``{task name: UserTask}``.

    Raises:
        ConfigError: no such folder, no task file in it, or the first malformed file: one line
            naming the file and the field (YAML syntax, a missing ``task:``, an unknown field or
            ``output_type``, a hub dataset or data file that is not on this machine, a
            ``!function`` that does not import, a task name defined twice).
    """
    root = Path(include_path).expanduser()
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"
        raise ConfigError(f"--include-path {include_path}: {what}; pass the folder holding your task YAML files")
    files = _task_files(root)
    if not files:
        raise ConfigError(f"--include-path {include_path}: no *.yaml task file in it")
    return _scan(str(root), _signature(root, files))


def check_task(task: UserTask) -> None:
    """Loads one task's data and renders its first item (cached until its folder changes).

    Raises:
        ConfigError: the data does not load, a split is missing or empty, or a prompt field
            fails on the first item; one line naming the file and the field.
    """
    key = (task.file, task.name, _signature(task.file.parent, [task.file, *task.data]))
    if key not in _CHECKED:
        _check(task)
        _CHECKED.add(key)


def build(task: UserTask) -> dict[str, Any]:
    """Fresh lm-eval Task objects for a checked task (``{name: Task}``), data loaded offline."""
    with hub_offline():
        return _bare_manager().load([task.config])["tasks"]


def fingerprint(include_path: str | Path) -> str:
    """SHA-256 over the folder's files and every local data file its tasks read (contents)."""
    root = Path(include_path).expanduser()
    h = hashlib.sha256()
    tasks = load_tasks(root)
    paths = set(_walk(root)) | {f for t in tasks.values() for d in t.data for f in _walk(d)}
    for p in sorted(paths):
        h.update(f"{p.relative_to(root) if p.is_relative_to(root) else p}\n".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# ---------------------------------------------------------------------------- scanning


def _task_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*.yaml") if _kept(p.relative_to(root)) and p.is_file()),
                  key=lambda p: p.as_posix())


def _kept(rel: Path) -> bool:
    return not any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1])


def _walk(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
    elif path.is_dir():
        yield from (p for p in path.rglob("*") if p.is_file() and _kept(p.relative_to(path)))


def _signature(root: Path, files: list[Path]) -> tuple:
    paths = {f for p in [root, *files] for f in _walk(p)} if root.is_dir() else set(files)
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))


@functools.lru_cache(maxsize=8)
def _scan(root: str, signature: tuple) -> dict[str, UserTask]:
    out: dict[str, UserTask] = {}
    for path in _task_files(Path(root)):
        try:
            task = _task(path)
        except _Bad as e:
            raise ConfigError(str(e)) from None
        if task.name in out:
            raise ConfigError(f"{path}: field 'task': {task.name!r} is also defined in {out[task.name].file}; "
                              "give each task its own name")
        out[task.name] = task
    log.info("user tasks in %s: %s", root, ", ".join(out))
    return out


def _task(path: Path) -> UserTask:
    cfg = _read(path, frozenset({path.resolve()}))
    if "group" in cfg:
        raise _Bad(path, "group", "task groups are not supported in --include-path; name the tasks themselves "
                                  "in --tasks")
    if "class" in cfg:
        raise _Bad(path, "class", "Python-defined tasks are not supported in --include-path; write the task as YAML")
    name = cfg.get("task")
    if name is None:
        raise _Bad(path, "task", "missing; a task file starts with `task: NAME` (a shared base that others "
                                 "include must not end in .yaml)")
    if not isinstance(name, str) or not name.strip():
        raise _Bad(path, "task", f"must be a task name, got {name!r}")
    if name in OFFLINE_TASKS:
        raise _Bad(path, "task", f"{name!r} is one of greenopt's offline tasks; give your task another name")
    _check_fields(path, cfg)
    data: list[Path] = []
    if "custom_dataset" not in cfg:
        cfg, data = _local_data(path, cfg)
    return UserTask(name=name, file=path, config=_resolved(path, cfg, ""), data=tuple(data))


def _read(path: Path, seen: frozenset[Path]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise _Bad(path, None, f"cannot read it ({e}); save it as UTF-8 text") from None
    try:
        cfg = yaml.load(text, Loader=_loader(path.parent))  # a SafeLoader plus !function
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise _Bad(path, None, f"not valid YAML{at} ({problem})") from None
    if not isinstance(cfg, dict):
        raise _Bad(path, None, "not a mapping of task fields (task:, dataset_path:, output_type:, ...)")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(str(inc)) if Path(str(inc)).is_absolute() else path.parent / str(inc)
        if not inc_path.is_file():
            raise _Bad(path, "include", f"no such file {inc_path}")
        if inc_path.resolve() in seen:
            raise _Bad(path, "include", f"{inc_path} includes itself (a cycle)")
        base = _read(inc_path, seen | {inc_path.resolve()})
        base.pop("task_list", None)
        merged.update(base)
    return {**merged, **cfg}


def _loader(base_dir: Path) -> type:
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        pass

    def function(loader: Any, node: Any) -> _Function:
        return _Function(str(loader.construct_scalar(node)), base_dir)

    yaml.add_constructor("!function", function, Loader=Loader)
    return Loader


def _check_fields(path: Path, cfg: dict[str, Any]) -> None:
    from lm_eval.config.task import TaskConfig

    known = {f.name for f in dataclasses.fields(TaskConfig)} | _STRUCTURAL
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see lm-eval's task guide for the fields"
            raise _Bad(path, key, f"not an lm-eval task field; {hint}")
    out = cfg.get("output_type", "generate_until")
    if out not in OUTPUT_TYPES:
        raise _Bad(path, "output_type", f"unknown output_type {out!r}; use one of {', '.join(OUTPUT_TYPES)}")
    if not cfg.get("test_split") and not cfg.get("validation_split"):
        raise _Bad(path, "test_split", "missing; name the split to score in test_split (or validation_split)")


def _resolved(path: Path, value: Any, where: str) -> Any:
    """``value`` with every ``!function`` imported, naming the field of the first that does not."""
    if isinstance(value, _Function):
        from lm_eval.tasks._yaml_loader import _import_func_in_yml

        try:
            return _import_func_in_yml(value.spec, value.base_dir)
        except Exception as e:  # noqa: BLE001 - the user's module may raise anything on import
            raise _Bad(path, where, f"!function {value.spec} does not import ({type(e).__name__}: "
                                    f"{_first_line(e)}); put {value.spec.rpartition('.')[0]}.py beside "
                                    "the YAML file, or fix it") from None
    if isinstance(value, dict):
        return {k: _resolved(path, v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolved(path, v, f"{where}.{i}") for i, v in enumerate(value)]
    return value


# ---------------------------------------------------------------------------- local data


def _local_data(path: Path, cfg: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    """The config with its data paths made absolute, and those paths; _Bad when data is not local."""
    source = cfg.get("dataset_path")
    if not isinstance(source, str) or not source:
        raise _Bad(path, "dataset_path", "missing; point it at local data (dataset_path: json, "
                                         "dataset_kwargs.data_files: ...)")
    if not isinstance(cfg.get("dataset_kwargs") or {}, dict):
        raise _Bad(path, "dataset_kwargs", "must be a mapping (data_files: ..., data_dir: ...)")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    data: list[Path] = []
    if "data_files" in kwargs:
        kwargs["data_files"] = _files(path, kwargs["data_files"], "dataset_kwargs.data_files", data)
        _splits_present(path, cfg, kwargs["data_files"])
    if "data_dir" in kwargs:
        kwargs["data_dir"] = _local(path, kwargs["data_dir"], "dataset_kwargs.data_dir", data, folder=True)
    local = path.parent / source
    if source in packaged_builders():
        if not data:
            raise _Bad(path, "dataset_kwargs.data_files", f"missing; dataset_path: {source} reads local files: "
                                                          "set dataset_kwargs.data_files: {test: FILE}")
    elif Path(source).is_absolute() or local.exists() or not _HUB_ID.match(source):
        source = _local(path, source, "dataset_path", data, folder=True)
    else:
        _, why = probe(source, cfg.get("dataset_name"), kwargs)
        if why is not None:
            raise _Bad(path, "dataset_path", f"{source!r} is a hub dataset; greenopt runs offline, point it at a "
                                             "local file (dataset_path: json, dataset_kwargs.data_files: ...)")
    out = {**cfg, "dataset_path": source}
    if kwargs:
        out["dataset_kwargs"] = kwargs
    return out, data


def _files(path: Path, value: Any, where: str, data: list[Path]) -> Any:
    if isinstance(value, dict):
        return {k: _files(path, v, f"{where}.{k}", data) for k, v in value.items()}
    if isinstance(value, list):
        return [_files(path, v, f"{where}.{i}", data) for i, v in enumerate(value)]
    return _local(path, value, where, data, folder=False)


def _local(path: Path, value: Any, where: str, data: list[Path], *, folder: bool) -> str:
    """One data path, absolute (relative ones against the YAML's folder); _Bad unless it is on this machine."""
    if not isinstance(value, str) or not value:
        raise _Bad(path, where, f"must be a file path, got {value!r}")
    if "://" in value:
        raise _Bad(path, where, f"{value} is a URL and greenopt runs offline; download it and point at the "
                                "local file")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else path.parent / p
    if glob.has_magic(str(p)):
        hits = [Path(h) for h in sorted(glob.glob(str(p), recursive=True))]
        if not hits:
            raise _Bad(path, where, f"no file matches {p}")
        data.extend(hits)
        return str(p)
    if folder and p.is_file():
        raise _Bad(path, where, f"{p} is a file; use dataset_path: json (or csv, parquet, ...) with "
                                f"dataset_kwargs.data_files: {{test: {value}}}")
    if not p.exists():
        raise _Bad(path, where, f"no such {'folder' if folder else 'file'} {p} (relative paths are read from "
                                "the YAML file's folder)")
    data.append(p)
    return str(p)


def _splits_present(path: Path, cfg: dict[str, Any], files: Any) -> None:
    if not isinstance(files, dict):
        return  # one file or a list: datasets names the split "train"
    for field in ("test_split", "validation_split", "training_split", "fewshot_split"):
        split = cfg.get(field)
        if split and split not in files:
            raise _Bad(path, field, f"split {split!r} is not a key of dataset_kwargs.data_files "
                                    f"({', '.join(map(str, files))})")


# ---------------------------------------------------------------------------- building


@functools.lru_cache(maxsize=1)
def _bare_manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


_CHECKED: set[tuple] = set()  # (file, name, signature) of tasks that built and rendered an item


def _check(task: UserTask) -> None:
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating test split" is not the user's business here
    try:
        built = build(task)
    except Exception as e:  # noqa: BLE001 - lm-eval, datasets, jinja or the user's own functions
        cause = e.__cause__ or e.__context__
        why = f" ({type(cause).__name__}: {_first_line(cause)})" if cause is not None else ""
        raise ConfigError(f"{_blame(task, e)}: {type(e).__name__}: {_first_line(e)}{why}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if len(built[task.name].eval_docs) == 0:
        field = "test_split" if task.config.get("test_split") else "validation_split"
        raise ConfigError(f"{task.file}: field '{field}': split {task.config[field]!r} has no items")


def _blame(task: UserTask, e: BaseException) -> str:
    field = None
    for frame in traceback.extract_tb(e.__traceback__):
        field = _FRAME_FIELDS.get(frame.name, field)
    if field in ("test_split", "validation_split") and task.config.get("process_docs") is not None:
        field = "process_docs"
    if field == "dataset_path" and task.config.get("dataset_kwargs"):
        field = "dataset_kwargs.data_files" if "data_files" in task.config["dataset_kwargs"] else "dataset_kwargs"
    return f"{task.file}: field '{field}'" if field else f"{task.file}: the task does not build"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
