"""ONNX Runtime GenAI: the transformed checkpoint built by its model builder (fp32, or int4/int8 MatMulNBits).

The dense checkpoint (greenopt's depth, width and prune steps applied) is saved as float32, built
by ``onnxruntime_genai.models.builder`` and cached under
``greenopt.offline.home() / "runtimes" / "onnxruntime-genai" / <key>``, the key hashing the saved
files, the :class:`~greenopt.config.Deploy`, the precision and execution provider, and the
installed onnxruntime-genai and onnxruntime versions. A build runs in a temp folder beside the
cache and is renamed into place whole, so a killed build leaves no half-written entry and a second
build of the same model is a cache hit.

A model whose decoder Linears hold greenopt's rtn/gptq codes (a 4- or 8-bit quantize step) is
written as a GPTQ checkpoint instead (:mod:`greenopt.runtimes.gptq_export`), and the builder
imports those codes into MatMulNBits unchanged (lm_head stays float); the build record says so
(``weights_source``: :data:`~greenopt.runtimes.gptq_export.IMPORTED`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
import torch

from greenopt.config import Deploy
from greenopt.errors import ConfigError, ModelError
from greenopt.offline import home
from greenopt.records import RuntimeDescription
from greenopt.runtimes.base import Runtime
from greenopt.runtimes.gptq_export import GPTQ_BITS, IMPORTED, GptqExport, has_packed, write_gptq

log = logging.getLogger(__name__)

#: What greenopt records beside a build (dtype, kernels); kept out of :meth:`OrtGenAIRuntime.export`.
BUILD_FILE = "greenopt_build.json"
_STAGING = ".building-"  # prefix of temp folders beside the cache entries
_STALE_S = 24 * 3600  # a staging folder this old was left by a killed build
_IO_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_PRECISION_OF = {v: k for k, v in _IO_DTYPES.items()}
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


class OrtGenAIRuntime(Runtime):
    """A model built by ONNX Runtime GenAI's model builder and run by its generator (greedy, KV cache).

    Build one with :meth:`build` (or :func:`greenopt.runtimes.realise`). The ONNX session takes
    ``torch.get_num_threads()`` intra-op threads on CPU, re-read before each call (a change
    reloads the model).

    Args:
        folder: a built folder (``model.onnx``, its ``.data``, ``genai_config.json``, tokenizer
            files and :data:`BUILD_FILE`).
        deploy: the deployment it was built for.
        device: ``cpu`` or ``cuda:N``.
    """

    name = "onnxruntime-genai"

    def __init__(self, folder: Path, deploy: Deploy, device: str = "cpu") -> None:
        self.folder, self.deploy, self.device = Path(folder), deploy, device
        meta = json.loads((self.folder / BUILD_FILE).read_text(encoding="utf-8"))
        self.dtype: str = meta["dtype"]
        self.execution_provider: str = meta["execution_provider"]
        self.kernels: tuple[str, ...] = tuple(meta["kernels"])
        self.weights_source: str | None = meta.get("weights_source")
        self._model: og.Model | None = None
        self._threads: int | None = None

    @classmethod
    def build(cls, model: torch.nn.Module, tokenizer, deploy: Deploy) -> OrtGenAIRuntime:
        """Builds (or finds in the cache) ``model`` as an ONNX Runtime GenAI model for ``deploy``.

        Args:
            model: a llama-like transformers causal LM (any dtype; saved as float32), dense or with
                every decoder Linear quantized by a 4/8-bit gptq or rtn step (its codes imported);
                left as found.
            tokenizer: its tokenizer, saved beside the model.
            deploy: runtime ``onnxruntime-genai``; ``weights`` dense (fp32), int4 or int8
                (MatMulNBits with ``block_size`` and ``accuracy_level``); for imported codes, the
                int4/int8 of their width, and ``block_size`` their group size.

        Returns:
            The runtime, on the model's device.

        Raises:
            ConfigError: ``deploy`` is for another runtime, or its dtype or weights cannot be
                built for this device, or the model's packed codes cannot be imported (names the module).
            ModelError: the model builder rejects the model (e.g. an architecture it does not know).
        """
        if deploy.runtime != cls.name:
            raise ConfigError(f"OrtGenAIRuntime.build got a deploy for runtime {deploy.runtime}; "
                              f"set runtime: {cls.name}")
        param = next(model.parameters())
        device = str(param.device)
        precision, provider, extra = _builder_options(deploy, param.dtype, device)
        imported = has_packed(model)
        root = home() / "runtimes" / cls.name
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=root))
        try:
            hf = staging / "hf"
            if imported:
                extra = extra + _import_options(deploy, write_gptq(model, tokenizer, hf))
            else:
                _save_float32(model, tokenizer, hf)
            key = _cache_key(hf, deploy, precision, provider, extra)
            entry = root / key
            if (entry / BUILD_FILE).is_file():
                log.info("onnxruntime-genai: cache hit %s", entry)
            else:
                _build_into(hf, staging / "out", precision, provider, extra, staging / "cache",
                            source=IMPORTED if imported else None)
                _place(staging / "out", entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(entry, deploy, device)

    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        ids = _rows(input_ids)
        batch, prompt = ids.shape
        total = prompt + new_tokens
        gen = self._generator(batch, max_length=total, min_length=total)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        out = np.stack([np.asarray(gen.get_sequence(i))[prompt:] for i in range(batch)])
        return torch.from_numpy(out.astype(np.int64))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = _rows(input_ids)
        gen = self._generator(ids.shape[0], max_length=ids.shape[1])
        gen.append_tokens(ids)  # the prefill: logits at every prompt position
        return torch.from_numpy(np.array(gen.get_output("logits"), dtype=np.float32))

    def describe(self) -> RuntimeDescription:
        options = {"weights": self.deploy.weights, "execution_provider": self.execution_provider}
        if self.deploy.weights != "dense":
            options |= {"block_size": str(self.deploy.block_size), "accuracy_level": str(self.deploy.accuracy_level)}
        if self.weights_source:
            options["weights_source"] = self.weights_source
        return RuntimeDescription(
            name=self.name, version=version("onnxruntime-genai"), dtype=self.dtype, device=self.device,
            threads=torch.get_num_threads() if self.device == "cpu" else None, kernels=self.kernels,
            options=options, libraries={"onnxruntime": version("onnxruntime")})

    def weight_bytes(self) -> int | None:
        """The ONNX graph and its external data, as built."""
        return sum(p.stat().st_size for p in self.folder.glob("model.onnx*"))

    def export(self, out: Path) -> tuple[str, ...]:
        """Copies the built model: ``model.onnx``, ``model.onnx.data``, ``genai_config.json`` and the
        tokenizer files, as ``og.Model(out)`` loads them."""
        names = sorted(p.name for p in self.folder.iterdir() if p.is_file() and p.name != BUILD_FILE)
        for name in names:
            shutil.copy2(self.folder / name, Path(out) / name)
        return tuple(names)

    def _generator(self, batch: int, max_length: int, min_length: int = 0) -> og.Generator:
        model = self._loaded()
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, num_beams=1, batch_size=batch,
                                  max_length=max_length, min_length=min_length)
        return og.Generator(model, params)

    def _loaded(self) -> og.Model:
        threads = torch.get_num_threads() if self.device == "cpu" else None
        if self._model is None or threads != self._threads:
            config = og.Config(str(self.folder))
            if threads is not None:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": threads}}}}))
            elif ":" in self.device:
                config.set_provider_option("cuda", "device_id", self.device.partition(":")[2])
            self._model, self._threads = og.Model(config), threads
        return self._model


def _rows(input_ids: torch.Tensor) -> np.ndarray:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    return np.ascontiguousarray(input_ids.detach().cpu().numpy().astype(np.int32))


def _builder_options(deploy: Deploy, model_dtype: torch.dtype, device: str) -> tuple[str, str, list[str]]:
    """(precision, execution provider, extra options) for the builder; refuses what it cannot build."""
    if device.startswith("cuda"):
        if not og.is_cuda_available():
            raise ConfigError("the installed onnxruntime-genai has no CUDA execution provider; install "
                              "onnxruntime-genai-cuda, or move the model to cpu")
        provider = "cuda"
        dtype = str(model_dtype).removeprefix("torch.") if deploy.dtype == "auto" else deploy.dtype
    else:
        if deploy.dtype not in ("auto", "float32"):
            raise ConfigError(f"onnxruntime-genai on CPU runs float32 (with int4/int8 weights); "
                              f"dtype {deploy.dtype} is for CUDA")
        provider, dtype = "cpu", "float32"
    if deploy.weights == "dense":
        return _PRECISION_OF[dtype], provider, []
    extra = [f"block_size={deploy.block_size}", f"accuracy_level={deploy.accuracy_level}"]
    if provider == "cuda":  # quantized CUDA builds compute in float16, or bfloat16 for int4
        if dtype == "bfloat16" and deploy.weights == "int4":
            extra.append("use_cuda_bf16=true")
        elif dtype != "float16":
            raise ConfigError(f"onnxruntime-genai {deploy.weights} weights on CUDA compute in float16"
                              f"{' or bfloat16' if deploy.weights == 'int4' else ''}; set dtype accordingly")
    return deploy.weights, provider, extra


def _import_options(deploy: Deploy, codes: GptqExport) -> list[str]:
    """Builder options for imported GPTQ codes; refuses a deploy that names another width or block size."""
    want = GPTQ_BITS[codes.bits]
    if deploy.weights != want:
        raise ConfigError(f"the model holds {codes.bits}-bit GPTQ codes, which onnxruntime-genai imports as "
                          f"weights: {want}, not {deploy.weights}; set weights: {want}")
    if deploy.block_size != codes.group_size:
        raise ConfigError(f"the model's GPTQ codes come in groups of {codes.group_size}, which become the MatMulNBits "
                          f"blocks; set block_size: {codes.group_size}, not {deploy.block_size}")
    # The head and embedding are float in torch; the builder would quantize them (a tied pair too).
    return ["nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"]


def _save_float32(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """Saves ``model`` as float32 on CPU (tied weights stay tied), without touching the model itself."""
    cast: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in cast:
            cast[key] = t.detach().to("cpu", torch.float32) if t.is_floating_point() else t.detach().cpu()
        state[name] = cast[key]
    model.save_pretrained(out, state_dict=state)
    tokenizer.save_pretrained(out)


def _cache_key(hf: Path, deploy: Deploy, precision: str, provider: str, extra: list[str]) -> str:
    h = hashlib.sha256()
    head = {"deploy": deploy.model_dump(mode="json"), "precision": precision, "provider": provider,
            "extra": extra, "onnxruntime-genai": version("onnxruntime-genai"), "onnxruntime": version("onnxruntime")}
    h.update(json.dumps(head, sort_keys=True).encode())
    for path in sorted(p for p in hf.rglob("*") if p.is_file()):
        h.update(f"\0{path.relative_to(hf)}\0".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def _build_into(hf: Path, out: Path, precision: str, provider: str, extra: list[str], cache: Path,
                source: str | None = None) -> None:
    """Runs the model builder (its prints captured to the debug log) and writes :data:`BUILD_FILE`
    (with ``weights_source`` when the weights were imported, not quantized by the builder)."""
    builder = _import_builder()
    captured = io.StringIO()
    log.info("onnxruntime-genai: building %s %s model", precision, provider)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            options = builder.parse_extra_options(None, str(hf), str(out), precision, provider, str(cache), extra)
            builder.create_model(None, str(hf), str(out), precision, provider, str(cache), **options)
    except (ValueError, NotImplementedError) as e:
        log.debug("model builder output:\n%s", captured.getvalue())
        raise ModelError(f"onnxruntime-genai's model builder cannot build this model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); deploy it with runtime: transformers") from e
    log.debug("model builder output:\n%s", captured.getvalue())
    meta = {"dtype": _IO_DTYPES[_io_precision(precision, provider, extra)], "execution_provider": provider,
            "kernels": list(_kernels(out / "model.onnx"))}
    if source:
        meta["weights_source"] = source
    (out / BUILD_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _io_precision(precision: str, provider: str, extra: list[str]) -> str:
    if precision in _IO_DTYPES:
        return precision
    if provider == "cpu":
        return "fp32"
    return "bf16" if "use_cuda_bf16=true" in extra else "fp16"


def _import_builder():
    """The builder module; its import runs ``logging.basicConfig(level=INFO)`` (onnxruntime's
    quantizer), which would turn on every library's INFO logs, so the root logger is restored."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime_genai.models import (
        builder,  # lazy: onnxruntime-genai model builder (transformers, onnx-ir)
    )

    root.handlers[:], root.level = handlers, level
    quantizer = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    if not any(isinstance(f, _GatherAt8Bits) for f in quantizer.filters):
        quantizer.addFilter(_GatherAt8Bits())
    return builder


class _GatherAt8Bits(logging.Filter):
    """An int8 build logs ERROR "Gather only supports 4 bits quantization" and leaves the embedding
    lookup dense, as intended (the build record's kernels show it): not an error of the build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Gather only supports 4 bits" not in record.getMessage()


def _kernels(model_onnx: Path) -> tuple[str, ...]:
    """The weight paths in the built graph, e.g. ``MatMulNBits int4 block 32 accuracy_level 4 x29``, most first."""
    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    weights = {init.name: init.data_type for init in graph.initializer}
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            a = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
            counts[f"MatMulNBits int{a.get('bits', 4)} block {a.get('block_size')} "
                   f"accuracy_level {a.get('accuracy_level', 0)}"] += 1
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in weights:
            counts[f"MatMul {_ONNX_DTYPES.get(weights[node.input[1]], weights[node.input[1]])}"] += 1
    return tuple(f"{k} x{n}" for k, n in counts.most_common())


def _sweep(root: Path) -> None:
    """Removes staging folders that killed builds left (older than a day; a live build is minutes)."""
    now = time.time()
    for path in root.glob(f"{_STAGING}*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > _STALE_S:
                shutil.rmtree(path, ignore_errors=True)


def _place(built: Path, entry: Path) -> None:
    """Renames a finished build into the cache; a concurrent build that got there first wins."""
    try:
        os.rename(built, entry)
    except OSError:
        if not (entry / BUILD_FILE).is_file():
            raise
        log.info("onnxruntime-genai: %s was built concurrently; using it", entry)
