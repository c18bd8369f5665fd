"""Export a compressed model as a checkpoint that carries its energy label, and load it back.

``export(model, tokenizer, variant, card, out_dir)`` writes, atomically (a staging folder
``.<out-name>.greenopt-staging-<pid>-*`` beside ``out_dir``, renamed into place; never
half-written; the staging folders of killed exports are removed by the next export to the
same ``out_dir``), with ordinary permissions (0666/0777 less the umask):

- the weights as safetensors, with config, generation config and tokenizer;
- ``label.json``, ``LABEL.md``, ``label.svg`` (the card) and a ``README.md`` model card;
- ``greenopt_export.json``: base model, variant, protocol, tasks, schemes, seeds, library
  versions and the SHA-256 of the weight files (what ``greenopt verify`` re-checks).

Which loader reads it back:

- structural variants (depth, uniform width, expert pruning, unstructured/2:4 masks) are
  ordinary smaller models: ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``;
- bitsandbytes variants of one kind (all NF4, all FP4 or all int8, the rest dense) carry
  transformers' own ``quantization_config`` and load with ``from_pretrained`` as well;
- everything else (greenopt's packed rtn/hqq/gptq weights, torchao int8, MoEfied FFNs,
  per-layer widths, mixed bitsandbytes kinds) has no transformers loader: the weights go to
  ``greenopt-model.safetensors`` (so a plain ``from_pretrained`` fails loudly instead of
  loading the wrong model) with ``greenopt_modules.json``, and ``greenopt.load(DIR)`` rebuilds
  the model. The reason is written into the manifest and the README;
- a variant deployed on ONNX Runtime GenAI ships the runtime's own artifact (``model.onnx``, its
  ``.data``, ``genai_config.json``, tokenizer files and the build record), which
  ``onnxruntime_genai.Model(DIR)`` loads: the model that was measured, not a checkpoint to rebuild it from.
- a variant deployed on llama.cpp ships its GGUF file (``model.gguf``: weights, hyperparameters
  and tokenizer, as quantized) and the build record; ``llama_cpp.Llama(model_path=DIR/model.gguf)``
  or any llama.cpp tool loads it.

A transformers deployment in another dtype (``deploy.dtype: bfloat16``) is written in that dtype:
the weights are the measured ones; the manifest's ``dtype`` is the baseline's.

Example:
    >>> from greenopt.ship.exporter import export, load
    >>> export(model, tok, variant, card, "exports/int4")     # doctest: +SKIP
    >>> model = load("exports/int4")                            # doctest: +SKIP
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from greenopt._io import library_versions, write_text
from greenopt._version import __version__
from greenopt.config import (
    CalibSpec,
    EvalSpec,
    LabelSpec,
    Protocol,
    Variant,
    load_json,
)
from greenopt.config.recipe import Gate
from greenopt.errors import ConfigError, WriteError
from greenopt.label.card import write_card
from greenopt.models import checkpoint as em
from greenopt.models.checkpoint import load
from greenopt.records import (
    ApplyReport,
    ExportManifest,
    LabelCard,
    VariantInfo,
)
from greenopt.runtimes import Runtime, load_artifact, realise
from greenopt.ship.readme import write_readme

log = logging.getLogger(__name__)

MANIFEST = "greenopt_export.json"



class ExportProvenance(LabelSpec):
    """Where the variant came from and how it was (or is to be) measured; goes into the manifest.
    The label schemes and carbon intensity come from :class:`~greenopt.config.runtime.LabelSpec`."""

    base_model: str
    base_model_id: str | None = None
    protocol: Protocol | None = None
    eval: EvalSpec | None = None
    calib: CalibSpec = CalibSpec()
    seeds: dict[str, int] = Field(default_factory=dict)
    gate: Gate | None = None
    source: str | None = None
    apply_report: ApplyReport | None = None
    dtype: str | None = None


# ---------------------------------------------------------------------------- export


def export(model: torch.nn.Module, tokenizer: Any, variant: Variant, card: LabelCard | None,
           out_dir: str | Path, force: bool = False, *, provenance: ExportProvenance | None = None,
           check_reload: bool = False, runtime: Runtime | None = None) -> ExportManifest:
    """Writes ``model`` (with ``variant`` applied) as a self-describing folder, on the variant's runtime.

    A transformers deployment writes a checkpoint of ``model`` as it is (cast to the deploy's
    dtype beforehand, as measured); another runtime writes its built artifact.

    Args:
        model: the compressed in-memory causal LM (not modified).
        tokenizer: its tokenizer, saved beside the weights.
        variant: the variant that produced ``model`` from the base model, with its deploy.
        card: the variant's label card, or None when it has not been measured (``apply``).
        out_dir: the folder to create.
        force: replace an existing greenopt export at ``out_dir``.
        provenance: base model, protocol, tasks, schemes and seeds for the manifest
            (default: taken from the card where possible).
        check_reload: reload the written folder and compare its logits with ``model``'s (or
            the runtime's) before putting it in place.
        runtime: the runtime ``model`` was realised on for ``variant.deploy`` (default: realised
            here; only a runtime other than transformers writes its artifact).

    Returns:
        The manifest written as ``greenopt_export.json``.

    Raises:
        ConfigError: ``out_dir`` exists (without ``force``, or not a greenopt export), the model
            holds a module greenopt cannot serialize, its dtype is not the deploy's, or the runtime
            is not the deploy's (all checked before writing).
    """
    out = Path(out_dir)
    if out.parent.is_dir():
        clean_stale(out)
    check_target(out, force)
    artifact = _artifact_runtime(model, tokenizer, variant, runtime)
    plan = em.plan_weights(model) if artifact is None else None
    prov = provenance or ExportProvenance(base_model=card.model_id if card else "unknown")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_folder(out, "staging")
    try:
        if artifact is None:
            em.write_weights(model, plan, tmp)
            tokenizer.save_pretrained(tmp)
            loader = (plan.loader, plan.reason, plan.notes)
        else:
            loader = _write_artifact(artifact, tmp)
        manifest = _manifest(model, variant, card, prov, loader, tmp)
        if card is not None:
            write_card(card, tmp)
        write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
        write_readme(tmp, card, manifest)
        if check_reload and artifact is None:
            _check_reload(model, tmp)
        elif check_reload:
            _check_artifact_reload(artifact, variant, tmp)
        _open_up(tmp)
        _swap_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _write_failure(e)
        if failure is not None:
            raise WriteError(f"cannot write the export {out}: {failure}") from None
        raise
    log.info("exported %s (%s loader) to %s", manifest.variant_name, manifest.loader, out)
    return manifest


def _artifact_runtime(model: torch.nn.Module, tokenizer: Any, variant: Variant,
                      runtime: Runtime | None) -> Runtime | None:
    """The runtime whose artifact the export ships (None: a transformers checkpoint of ``model``)."""
    deploy = variant.deploy
    if runtime is not None and runtime.name != deploy.runtime:
        raise ConfigError(f"export got a {runtime.name} runtime for a variant deployed on {deploy.runtime}; "
                          "pass the runtime the variant was realised on")
    if deploy.runtime != "transformers":
        return runtime or realise(model, tokenizer, deploy, steps=variant.steps)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    if deploy.dtype != "auto" and deploy.dtype not in dtypes:
        raise ConfigError(f"the model is {'/'.join(sorted(dtypes))} but the variant deploys {deploy.dtype}; cast it "
                          "with greenopt.runtimes.cast(model, variant.deploy) before applying the steps, as measured")
    return None


def _write_artifact(runtime: Runtime, folder: Path) -> tuple[str, str, tuple[str, ...]]:
    """Writes the runtime's artifact and the build record that reloads it; returns (loader, reason, notes)."""
    if runtime.name == "onnxruntime-genai":
        from greenopt.runtimes.ortgenai import BUILD_FILE  # lazy: onnxruntime-genai
        what = "an ONNX Runtime GenAI model"
    elif runtime.name == "llama.cpp":
        from greenopt.runtimes.llamacpp import BUILD_FILE  # lazy: llama-cpp-python
        what = "a llama.cpp GGUF file"
    else:
        raise ConfigError(f"greenopt cannot export a {runtime.name} artifact yet; deploy on transformers, "
                          "onnxruntime-genai or llama.cpp")
    names = runtime.export(folder)
    shutil.copy2(runtime.folder / BUILD_FILE, folder / BUILD_FILE)  # what the runtime's class reads back
    d = runtime.describe()
    reason = f"{what} ({d.dtype}; {', '.join(d.kernels) or 'no weight kernels found'}), not a transformers checkpoint"
    return runtime.name, reason, (f"artifact files: {', '.join(names)}",)


def _write_failure(e: BaseException) -> str | None:
    """Why writing the export failed, for a file-system error (safetensors wraps its own), else None."""
    if isinstance(e, WriteError):
        return str(e).removeprefix("cannot write ")
    text = str(e)
    if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
            w in text for w in ("os error 28", "No space left", "StorageFull"))
        if full:
            return "no space left on device; free some space or choose another --out"
        if isinstance(e, OSError):
            return f"{(e.strerror or text).lower()}; choose a writable --out"
    return None


def check_target(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it or choose another --out")
    if not out.is_dir():
        raise ConfigError(f"{out} is a file, not an export folder; remove it or choose another --out")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ConfigError(f"{out} is not a greenopt export (no {MANIFEST}); refusing to replace it even "
                          "with --force; choose another --out")


_STALE_AFTER_S = 24 * 3600  # a staging folder this old is stale even if its pid is alive (reused)


def clean_stale(out: Path) -> None:
    """Removes the staging folders that killed exports to ``out`` left beside it.

    A folder is stale when its process (the pid in its name, on this machine) is gone, or
    when it is older than a day. A killed ``--force`` export may have moved the previous
    export aside without putting the new one in place: that export is moved back first.
    """
    prefix = f".{out.name}.greenopt-"
    for p in sorted(out.parent.iterdir()):
        m = re.fullmatch(re.escape(prefix) + r"(staging|old)-(\d+)-\w+", p.name)
        if m is None or not p.is_dir() or not _stale(p, int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and (p / "export" / MANIFEST).is_file():
            log.warning("restoring %s, which an export killed while replacing it left in %s", out, p.name)
            os.replace(p / "export", out)
        log.info("removing %s, left by a killed export", p)
        shutil.rmtree(p, ignore_errors=True)


def _stale(folder: Path, pid: int) -> bool:
    try:
        if time.time() - folder.stat().st_mtime > _STALE_AFTER_S:
            return True
    except OSError:
        return False
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def _hidden_folder(out: Path, kind: str) -> Path:
    """A new ``.<out-name>.greenopt-<kind>-<pid>-*`` folder beside ``out`` (mode 0777 less the umask)."""
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.greenopt-{kind}-{os.getpid()}-"))
    os.chmod(folder, 0o777 & ~_umask())
    return folder


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _open_up(folder: Path) -> None:
    """Ordinary permissions for everything in ``folder`` (mkdtemp/mkstemp make them owner-only)."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = _hidden_folder(out, "old")
        os.replace(out, old / "export")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "export", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _libraries() -> dict[str, str]:
    return {"python": platform.python_version(), "greenopt": __version__, **library_versions()}


#: The files ``weights_sha256`` covers, per loader.
WEIGHT_FILES = {"transformers": ("*.safetensors",), "greenopt": ("*.safetensors",),
                "onnxruntime-genai": ("*.onnx", "*.onnx.data"), "llama.cpp": ("*.gguf",)}


def files_sha256(folder: str | Path, loader: str = "transformers") -> str:
    """SHA-256 over the weight files of an export folder, for its loader (:data:`WEIGHT_FILES`).

    Checkpoints: the tensors of every ``*.safetensors`` file, hashing file name, tensor name,
    dtype, shape and bytes in sorted order; the files' JSON headers are left out (safetensors
    writes their metadata in no fixed order). ONNX Runtime GenAI: the name and bytes of
    ``model.onnx`` and its external data, in sorted order; llama.cpp: those of the GGUF file.
    """
    folder = Path(folder)
    if loader in ("onnxruntime-genai", "llama.cpp"):
        return _raw_sha256(sorted({p for pattern in WEIGHT_FILES[loader] for p in folder.glob(pattern)}))
    from safetensors import safe_open

    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.name.encode() + b"\0")
        with safe_open(str(p), framework="pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key).contiguous()
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode() + b"\0")
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _raw_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _manifest(model, variant: Variant, card: LabelCard | None, prov: ExportProvenance,
              loader: tuple[str, str, tuple[str, ...]], folder: Path) -> ExportManifest:
    name = variant.name or (card.variant.name if card else None) or ("baseline" if variant.is_baseline
                                                                   else variant.hash)
    if card is not None:
        info = card.variant.model_copy(update={"name": name})
    else:
        rep = prov.apply_report
        info = VariantInfo(name=name, hash=variant.hash,
                           steps=tuple(s.summary for s in rep.steps) if rep else (),
                           params_before=rep.params_before if rep else None,
                           params_after=rep.params_after if rep else None,
                           weight_bytes_before=rep.weight_bytes_before if rep else None,
                           weight_bytes_after=rep.weight_bytes_after if rep else None)
    kind, reason, notes = loader
    dtype = prov.dtype or str(next(model.parameters()).dtype).replace("torch.", "")
    seeds = {"calibration": prov.calib.seed, **({"protocol": prov.protocol.seed} if prov.protocol else {}),
             **({"eval": prov.eval.seed} if prov.eval else {}), **prov.seeds}
    return ExportManifest(
        greenopt_version=__version__, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        base_model=prov.base_model, base_model_id=prov.base_model_id or (card.model_id if card else prov.base_model),
        variant=variant, variant_name=name, variant_info=info, loader=kind, loader_reason=reason,
        dtype=dtype, protocol=prov.protocol, card_protocol_id=card.protocol_id if card else None,
        eval=prov.eval, relative_scheme=_scheme_ref(folder, card, "relative", prov.relative_scheme),
        absolute_scheme=_scheme_ref(folder, card, "absolute", prov.absolute_scheme),
        intensity_g_per_kwh=card.carbon.intensity_g_per_kwh if card else prov.intensity_g_per_kwh,
        calib=prov.calib, seeds=seeds, libraries=_libraries(), weights_sha256=files_sha256(folder, kind),
        apply_report=prov.apply_report, gate=prov.gate, source=prov.source, notes=notes,
    )


def _scheme_ref(folder: Path, card: LabelCard | None, which: str, fallback: str | None) -> str | None:
    """Copies the card's scheme into the export (``scheme-<which>.yaml``) and names that file."""
    import yaml

    scheme = None if card is None else (card.relative_scheme if which == "relative" else card.absolute_scheme)
    if scheme is None:
        return fallback if card is None else None
    fname = f"scheme-{which}.yaml"
    write_text(folder / fname, yaml.safe_dump(scheme.model_dump(mode="json"), sort_keys=False))
    return fname


def _check_reload(model: torch.nn.Module, folder: Path) -> None:
    probe = torch.arange(1, 17).unsqueeze(0)
    device = next(model.parameters()).device
    with torch.inference_mode():
        want = model(probe.to(device)).logits.float().cpu()
        got = load(folder, device=str(device))(probe.to(device)).logits.float().cpu()
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
        raise ConfigError(f"export self-check failed: reloaded logits differ by {float((want - got).abs().max()):.3g}; "
                          "nothing was written")


def _check_artifact_reload(runtime: Runtime, variant: Variant, folder: Path) -> None:
    probe = torch.arange(1, 17).unsqueeze(0)
    want = runtime.logits(probe)
    got = load_artifact(folder, variant.deploy, runtime.device).logits(probe)
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
        raise ConfigError(f"export self-check failed: the written {runtime.name} artifact's logits differ by "
                          f"{float((want - got).abs().max()):.3g}; nothing was written")


# ---------------------------------------------------------------------------- load


def load_manifest(folder: str | Path) -> ExportManifest:
    """Reads ``greenopt_export.json`` of an export folder.

    Raises:
        ConfigError: not a greenopt export, or an invalid manifest.
    """

    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise ConfigError(f"{folder}: not a greenopt export (no {MANIFEST}); write one with greenopt export/apply")
    return load_json(p, ExportManifest)


# ---------------------------------------------------------------------------- README


# ---------------------------------------------------------------------------- from a search run


