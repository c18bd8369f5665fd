"""Whether a task's dataset loads on this machine with the Hugging Face hub offline.

greenopt scores every task with ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``
(:func:`hub_offline`). Under those flags ``datasets`` loads a packaged builder (``json``,
``csv``, ``parquet``, ``arrow``, ...) from local files, a local folder, or a hub dataset only
when it was prepared before in the local datasets cache (``HF_DATASETS_CACHE``, default
``~/.cache/huggingface/datasets``); the hub's own file cache is not consulted.
:func:`dataset_problem` asks ``datasets`` itself, with those flags set, to resolve the
dataset's builder: it reads no data and contacts nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def packaged_builders() -> frozenset[str]:
    """``datasets``' packaged builder names (``json``, ``csv``, ``parquet``, ``arrow``, ...)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return frozenset(_PACKAGED_DATASETS_MODULES)


def datasets_cache() -> str:
    """The local datasets cache a hub dataset must be prepared in to load offline."""
    import datasets.config

    return str(datasets.config.HF_DATASETS_CACHE)


def dataset_problem(path: str, name: str | None = None, kwargs: dict[str, Any] | None = None) -> str | None:
    """Why ``datasets`` cannot load a dataset offline, or None when it can.

    Args:
        path: the ``dataset_path`` of a task (hub id, packaged builder or local folder).
        name: its ``dataset_name`` (the hub config), if any.
        kwargs: its ``dataset_kwargs`` (``data_files``, ``data_dir``, ...).

    Returns:
        None when the builder resolves with the hub offline, else the first line of the
        reason ``datasets`` gives.
    """
    return probe(path, name, kwargs)[1]


def probe(path: str, name: str | None = None, kwargs: dict[str, Any] | None = None) -> tuple[str | None, str | None]:
    """(the builder's cache folder, None) when the dataset loads offline, else (None, why not).

    The cache folder of a hub dataset is the prepared copy it would be read from (its name
    holds the config and a content hash), so it identifies the data; see :func:`dataset_problem`.
    """
    import datasets

    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "trust_remote_code"}  # gone in datasets 4
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "using the latest cached version" is the case we ask about
    try:
        with hub_offline():
            builder = datasets.load_dataset_builder(path, name, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each means "not loadable offline"
        text = str(e).strip()
        return None, f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    finally:
        quiet.setLevel(level)
    return str(builder.cache_dir), None


@contextlib.contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """Sets HF_DATASETS_OFFLINE/HF_HUB_OFFLINE (env and the flags libraries read at import)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    old_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    old_flags = [getattr(mod, attr) for mod, attr in flags]
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    for mod, attr in flags:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for (mod, attr), value in zip(flags, old_flags):
            setattr(mod, attr, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
