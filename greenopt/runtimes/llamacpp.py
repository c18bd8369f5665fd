"""llama.cpp: the transformed checkpoint written as GGUF, quantized by llama.cpp, run by llama-cpp-python.

The dense checkpoint (greenopt's depth, width, prune and heal steps applied) is written as one GGUF
file by :func:`greenopt.models.gguf.write` (float32; float16 or bfloat16 for a dense deploy in that
dtype), quantized by llama.cpp's own ``llama_model_quantize`` for a ``q*``/``iq*`` weights type,
and cached under ``greenopt.offline.home() / "runtimes" / "llama.cpp" / <key>``, the key hashing
the written GGUF, the :class:`~greenopt.config.Deploy` and the llama-cpp-python and gguf versions.
A build runs in a temp folder beside the cache and is renamed into place whole.

It runs with ``llama_cpp.Llama`` on CPU, as llama-cpp-python's defaults deploy it (f16 KV cache,
512-token batches). Generation is greedy and exactly ``new_tokens`` long: ``Llama.generate`` does
not stop at EOS, and every call starts from an empty KV cache (llama-cpp-python would otherwise
reuse a repeated prompt's cache and skip its prefill). llama-cpp-python's ``Llama`` serves one
sequence, so the rows of a batch run one after another.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from greenopt.config import Deploy
from greenopt.errors import ConfigError, ModelError
from greenopt.models import gguf as gguf_io
from greenopt.offline import home
from greenopt.records import RuntimeDescription
from greenopt.runtimes.base import Runtime

log = logging.getLogger(__name__)

#: What greenopt records beside a build (weights type, kernels, context length); kept out of :meth:`export`.
BUILD_FILE = "greenopt_build.json"
#: The GGUF file of a build and of an export.
MODEL_FILE = "model.gguf"
_STAGING = ".building-"
_STALE_S = 24 * 3600  # a staging folder this old was left by a killed build
_CTX_STEP = 256  # context windows are sized up to a multiple of this, from the longest call so far


class LlamaCppRuntime(Runtime):
    """A GGUF model run by llama-cpp-python (greedy, KV cache, one sequence at a time).

    Build one with :meth:`build` (or :func:`greenopt.runtimes.realise`). It computes with
    ``torch.get_num_threads()`` threads, re-read before each call (a change reloads the model), in
    a context sized to the longest call so far; scoring uses a second context that keeps every
    position's logits, so generation computes only the last position's, as deployed.

    Args:
        folder: a built folder (:data:`MODEL_FILE` and :data:`BUILD_FILE`).
        deploy: the deployment it was built for.
        device: ``cpu`` (greenopt runs llama.cpp on CPU).
    """

    name = "llama.cpp"

    def __init__(self, folder: Path, deploy: Deploy, device: str = "cpu") -> None:
        if device != "cpu":
            raise ConfigError(f"greenopt runs llama.cpp on cpu, not {device}; pass --device cpu")
        _check_build(deploy.weights)
        self.folder, self.deploy, self.device = Path(folder), deploy, device
        meta = json.loads((self.folder / BUILD_FILE).read_text(encoding="utf-8"))
        self.dtype: str = meta["dtype"]
        self.file_type: str = meta["file_type"]
        self.kernels: tuple[str, ...] = tuple(meta["kernels"])
        self.max_length = int(meta["context_length"])
        self._weight_bytes = int(meta["weight_bytes"])
        self._contexts: dict[bool, tuple[llama_cpp.Llama, int]] = {}  # logits_all -> (Llama, threads)
        # closed when the runtime goes, or at exit before llama_cpp's globals are torn down (its __del__ then fails)
        weakref.finalize(self, _close, self._contexts)

    @classmethod
    def build(cls, model: torch.nn.Module, tokenizer, deploy: Deploy) -> LlamaCppRuntime:
        """Writes (or finds in the cache) ``model`` as a GGUF for ``deploy``, quantized by llama.cpp.

        Args:
            model: a dense llama-architecture transformers causal LM on CPU (any dtype); left as found.
            tokenizer: its fast byte-level BPE tokenizer, written into the GGUF.
            deploy: runtime ``llama.cpp``; ``weights`` dense (the GGUF in ``dtype``, ``auto``: float32)
                or a llama.cpp type (``q8_0``, ``q4_k_m``, ...), quantized from float32.

        Returns:
            The runtime, on CPU.

        Raises:
            ConfigError: ``deploy`` is for another runtime, the model is not on CPU, or this
                llama-cpp-python build would run quantized weights through llama.cpp's AMX backend.
            ModelError: the model cannot be written as llama.cpp's llama architecture, or llama.cpp
                cannot quantize it.
        """
        if deploy.runtime != cls.name:
            raise ConfigError(f"LlamaCppRuntime.build got a deploy for runtime {deploy.runtime}; set runtime: {cls.name}")
        device = str(next(model.parameters()).device)
        if device != "cpu":
            raise ConfigError(f"greenopt runs llama.cpp on cpu; the model is on {device}: pass --device cpu")
        _check_build(deploy.weights)
        dtype = "float32" if deploy.dtype == "auto" or deploy.weights != "dense" else deploy.dtype
        root = home() / "runtimes" / cls.name
        with _staging(root) as staging:
            written = staging / "written.gguf"
            gguf_io.write(model, tokenizer, written, dtype)
            entry = root / _cache_key(written, deploy)
            if (entry / BUILD_FILE).is_file():
                log.info("llama.cpp: cache hit %s", entry)
            else:
                out = staging / "out"
                out.mkdir()
                if deploy.weights == "dense":
                    os.replace(written, out / MODEL_FILE)
                else:
                    _quantize(written, out / MODEL_FILE, deploy.weights)
                _write_build_record(out, dtype, int(model.config.max_position_embeddings))
                try:
                    os.rename(out, entry)  # into the cache whole
                except OSError:  # a concurrent build that got there first wins
                    if not (entry / BUILD_FILE).is_file():
                        raise
        return cls(entry, deploy, device)

    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        rows = _rows(input_ids)
        llm = self._llama(scoring=False, tokens=rows.shape[1] + new_tokens)
        out = np.empty((rows.shape[0], new_tokens), dtype=np.int64)
        for r, row in enumerate(rows):
            llm.reset()  # an empty cache: no prefix of an earlier call is reused
            tokens = llm.generate(row.tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
            for j in range(new_tokens):
                out[r, j] = next(tokens)
            tokens.close()
        return torch.from_numpy(out)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = _rows(input_ids)
        llm = self._llama(scoring=True, tokens=rows.shape[1])
        out = np.empty((*rows.shape, llm.n_vocab()), dtype=np.float32)
        for r, row in enumerate(rows):
            llm.reset()
            llm.eval(row.tolist())
            out[r] = llm.scores[: rows.shape[1]]
        return torch.from_numpy(out)

    def describe(self) -> RuntimeDescription:
        options = {"weights": self.deploy.weights, "file_type": self.file_type, "build": system_flags(),
                   "kv_cache": "f16", "n_batch": "512", "batch": "rows one after another"}
        return RuntimeDescription(
            name=self.name, version=llama_cpp.__version__, dtype=self.dtype, device=self.device,
            threads=torch.get_num_threads(), kernels=self.kernels, options=options,
            libraries={"gguf": version("gguf")})

    def weight_bytes(self) -> int | None:
        """The GGUF's tensor data, as built (its vocabulary metadata left out)."""
        return self._weight_bytes

    def export(self, out: Path) -> tuple[str, ...]:
        """Copies the GGUF file, which ``llama_cpp.Llama(model_path=out / "model.gguf")`` (or any
        llama.cpp tool) loads: weights, hyperparameters and tokenizer in one file."""
        shutil.copy2(self.folder / MODEL_FILE, Path(out) / MODEL_FILE)
        return (MODEL_FILE,)

    def _llama(self, scoring: bool, tokens: int) -> llama_cpp.Llama:
        """The context for generation (last logits) or scoring (all logits), holding ``tokens`` tokens."""
        threads = torch.get_num_threads()
        held = self._contexts.get(scoring)
        if held is not None and held[1] == threads and held[0].n_ctx() >= tokens:
            return held[0]
        if held is not None:
            held[0].close()
        n_ctx = -(-max(tokens, 1) // _CTX_STEP) * _CTX_STEP
        llm = llama_cpp.Llama(str(self.folder / MODEL_FILE), n_ctx=n_ctx, n_threads=threads,
                              n_threads_batch=threads, n_gpu_layers=0, logits_all=scoring, verbose=False)
        self._contexts[scoring] = (llm, threads)
        return llm


def _close(contexts: dict) -> None:
    for llm, _ in contexts.values():
        llm.close()
    contexts.clear()


def system_flags() -> str:
    """The CPU features this llama.cpp build uses, from ``llama_print_system_info`` (e.g. ``AVX2 F16C FMA``)."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return " ".join(re.findall(r"([A-Z0-9_]+) = 1\b", info)) or info.strip()


def _check_build(weights: str) -> None:
    """Refuses quantized weights on a build with llama.cpp's AMX backend: it segfaults on them (it did on
    Q8_0 and Q4_K_M here, llama.cpp 0.3.36; llama.cpp issue #20824), which would kill the whole run."""
    if weights != "dense" and "AMX_INT8" in system_flags().split():
        raise ConfigError("this llama-cpp-python build runs quantized GGUF through llama.cpp's AMX backend, which "
                          "segfaults on it (llama.cpp issue #20824); rebuild without AMX: make llamacpp")


def _rows(input_ids: torch.Tensor) -> np.ndarray:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    return input_ids.detach().cpu().numpy().astype(np.int64)


def _cache_key(written: Path, deploy: Deploy) -> str:
    h = hashlib.sha256()
    head = {"deploy": deploy.model_dump(mode="json"), "llama-cpp-python": llama_cpp.__version__,
            "gguf": version("gguf")}
    h.update(json.dumps(head, sort_keys=True).encode())
    with written.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def _quantize(src: Path, dst: Path, weights: str) -> None:
    """``llama_model_quantize`` from the float32 GGUF to ``weights`` (its rules pick each tensor's type)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{weights.upper()}")
    params.nthread = torch.get_num_threads()
    quiet = logging.getLogger("llama-cpp-python")  # its log callback prints llama.cpp's per-tensor lines to stderr
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.ERROR)  # as Llama(verbose=False) sets it
    log.info("llama.cpp: quantizing to %s", weights)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ModelError(f"llama.cpp could not quantize the model to {weights} (llama_model_quantize returned {rc}); "
                         "try another weights type, or weights: dense")


def _write_build_record(out: Path, dtype: str, context_length: int) -> None:
    """:data:`BUILD_FILE`: the dense dtype, llama.cpp's name for the file type, the tensor types and sizes."""
    import gguf  # lazy: a 0.3 s import

    reader = gguf.GGUFReader(out / MODEL_FILE)
    field = reader.fields.get("general.file_type")
    ftype = int(field.contents()) if field is not None else 0
    counts: Counter[str] = Counter()
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    for t in reader.tensors:  # matmul weights; the embedding counts only when it is the (tied) output too
        if len(t.shape) == 2 and (t.name != "token_embd.weight" or not has_output):
            counts[t.tensor_type.name] += 1
    meta = {"dtype": dtype, "file_type": (llama_cpp.llama_ftype_name(ftype) or b"?").decode(),
            "kernels": [f"{k} x{n}" for k, n in counts.most_common()], "context_length": context_length,
            "weight_bytes": sum(int(t.n_bytes) for t in reader.tensors)}
    (out / BUILD_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


@contextlib.contextmanager
def _staging(root: Path) -> Iterator[Path]:
    """A temp folder beside the cache entries, removed afterwards; first removes those killed builds
    left (a day old: a live build takes minutes)."""
    root.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - _STALE_S
    for old in root.glob(f"{_STAGING}*"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old)
    folder = Path(tempfile.mkdtemp(prefix=_STAGING, dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
