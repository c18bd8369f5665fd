"""GGUF files as transformers checkpoints: checked, converted once, cached, logits compared.

transformers reads a GGUF (``from_pretrained(folder, gguf_file=name)``) by dequantizing every
tensor, which takes seconds to minutes; greenopt does that once per file and keeps the result
as an ordinary safetensors folder. A user's file is cached by content under
``<greenopt home>/models/gguf-<sha256 prefix>``; the default model has its own fixed folder.
The folder appears only complete: it is written in a temporary folder next to it and renamed.

Example:
    >>> folder = converted(Path("my-model.Q4_K_M.gguf"))   # doctest: +SKIP
    >>> (folder / "model.safetensors").is_file()            # doctest: +SKIP
    True
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from greenopt import offline
from greenopt.errors import ModelError

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
PROVENANCE = "greenopt_gguf.json"
MAX_LOGIT_ERROR = 1e-4  # max |converted - GGUF| logit over max |GGUF| logit
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Energy is measured in joules."
_READ_ERRORS = (ValueError, IndexError, KeyError, struct.error, OSError)  # what gguf's reader raises on bad bytes


def is_gguf(path: Path) -> bool:
    """True for an existing file named ``*.gguf`` (any case)."""
    return path.suffix.lower() == ".gguf" and path.is_file()


def cache_folder(path: Path) -> Path:
    """Where the converted checkpoint of ``path`` lives: keyed by the file's content, not its name."""
    return offline.home() / "models" / f"gguf-{sha256(path)[:16]}"


def converted(path: Path, dest: Path | None = None) -> Path:
    """The transformers folder converted from GGUF ``path``, converting it on first use.

    Args:
        path: a ``.gguf`` file.
        dest: where the converted folder goes (default: :func:`cache_folder`).

    Returns:
        A folder with ``config.json``, ``model.safetensors`` (fp32) and the tokenizer.

    Raises:
        ModelError: the file is truncated or not a GGUF, transformers cannot read its
            architecture, or the converted model does not reproduce the GGUF's logits.
    """
    dest = dest or cache_folder(path)
    if not (dest / "config.json").is_file():
        convert(path, dest)
    return dest


@functools.lru_cache(maxsize=32)
def _sha256(resolved: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(resolved, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256(path: Path) -> str:
    """SHA-256 of the file's bytes (memoized per path, size and modification time)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def check(path: Path) -> str:
    """Checks that ``path`` is a complete GGUF file; returns its ``general.architecture``.

    Raises:
        ModelError: one line naming the file: not a GGUF, or truncated/corrupt.
    """
    import gguf  # lazy: a 0.3 s import, needed only for .gguf files

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if not (head.startswith(MAGIC) or MAGIC.startswith(head)):  # a short head may be a truncated GGUF
        raise ModelError(f"{path}: not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
    if len(head) < 8:
        raise ModelError(f"{path}: truncated GGUF file ({size} bytes, shorter than its header); download it again")
    try:
        reader = gguf.GGUFReader(path)
        arch_field = reader.fields.get("general.architecture")
        arch = arch_field.contents() if arch_field is not None else None
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except _READ_ERRORS as e:
        raise ModelError(f"{path}: truncated or corrupt GGUF file ({_first_line(e)}); "
                         "download it again") from None
    if end > size:
        raise ModelError(f"{path}: truncated GGUF file (tensor data needs {end} bytes, the file has {size}); "
                         "download it again")
    if not arch:
        raise ModelError(f"{path}: GGUF file has no general.architecture; it is not a model GGUF")
    return str(arch)


def convert(path: Path, dest: Path) -> None:
    """Converts GGUF ``path`` into the transformers folder ``dest``, atomically.

    The GGUF is dequantized to fp32 and saved with its tokenizer; the saved folder is read
    back and its logits on a short text must match the GGUF-loaded model's, else nothing is
    kept. If another process finished ``dest`` first, its folder is kept.

    Raises:
        ModelError: as :func:`converted`.
    """
    arch = check(path)
    log.info("converting %s (%s) to safetensors in %s (once)", path.name, arch, dest)
    model, tok = _read(path, arch)
    ids = _probe_ids(tok, int(model.config.vocab_size))
    ref = _logits(model, ids)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
        del model
        err = _relative_error(_logits(_reload(staged), ids), ref)
        if err > MAX_LOGIT_ERROR:
            raise ModelError(f"{path}: the converted checkpoint does not reproduce the GGUF's logits (relative "
                             f"error {err:.1e} > {MAX_LOGIT_ERROR:.0e}); nothing was cached, report this")
        (staged / PROVENANCE).write_text(json.dumps({
            "gguf": path.name, "sha256": sha256(path), "architecture": arch,
            "max_logit_error": err}, indent=2) + "\n", encoding="utf-8")
        _publish(staged, dest)


def _read(path: Path, arch: str):
    """The model (fp32, quantizer markers removed) and tokenizer as transformers reads them from the GGUF."""
    import transformers  # lazy: heavy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as e:
        if "not supported" in str(e):
            raise ModelError(f"{path}: transformers {transformers.__version__} cannot read GGUF architecture "
                             f"{arch!r} (it reads {', '.join(_supported())}); pass the model's transformers "
                             "folder instead") from None
        raise ModelError(f"{path}: transformers could not read this GGUF: {_first_line(e)}") from None
    except (NotImplementedError, KeyError, struct.error, OSError) as e:
        raise ModelError(f"{path}: transformers could not read this GGUF: {_first_line(e)}") from None
    # The GGUF quantizer only marks how the weights were read; they are dense fp32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tok


def _reload(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM  # lazy: heavy

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _supported() -> list[str]:
    from transformers import modeling_gguf_pytorch_utils as mgu  # lazy: heavy

    return [a for a in mgu.GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def _probe_ids(tok, vocab_size: int) -> torch.Tensor:
    ids = [i for i in tok(_PROBE_TEXT)["input_ids"][:32] if i < vocab_size]
    return torch.tensor([ids or list(range(min(32, vocab_size)))])


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _publish(staged: Path, dest: Path) -> None:
    if dest.exists() and not (dest / "config.json").is_file():
        shutil.rmtree(dest)  # a folder left by an older, non-atomic greenopt
    try:
        os.rename(staged, dest)
    except OSError:
        if not (dest / "config.json").is_file():
            raise
        log.info("%s was converted by another process meanwhile; keeping it", dest)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
