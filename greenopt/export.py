"""Export a compressed model as a checkpoint that carries its energy label, and load it back.

``export(model, tokenizer, variant, card, out_dir)`` writes, atomically (a temporary folder
beside ``out_dir``, renamed into place; never half-written):

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
  the model. The reason is written into the manifest and the README.

Example:
    >>> from greenopt.export import export, load
    >>> export(model, tok, variant, card, "exports/int4")     # doctest: +SKIP
    >>> model = load("exports/int4")                            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import optuna
import torch

from greenopt import export_modules as em
from greenopt import pareto, study_storage
from greenopt._io import library_versions, write_text
from greenopt._version import __version__
from greenopt.compress import apply
from greenopt.config import (
    CalibSpec,
    EvalSpec,
    Protocol,
    SearchSpec,
    Strict,
    Variant,
    load_json,
    load_yaml,
    protocol_preset,
    validated,
)
from greenopt.errors import ConfigError
from greenopt.label import load_scheme
from greenopt.label.card import LabelCard, VariantInfo, build_card, current_runtime, write_card
from greenopt.models import load_model
from greenopt.pareto import TrialRecord
from greenopt.recipe import Gate
from greenopt.records import ApplyReport, Record
from greenopt.rundir import RunDir
from greenopt.search import records

log = logging.getLogger(__name__)

MANIFEST = "greenopt_export.json"
README = "README.md"
_BEGIN, _END = "<!-- greenopt:label:begin -->", "<!-- greenopt:label:end -->"


class ExportProvenance(Strict):
    """Where the variant came from and how it was (or is to be) measured; goes into the manifest."""

    base_model: str
    base_model_id: str | None = None
    protocol: Protocol | None = None
    eval: EvalSpec | None = None
    relative_scheme: str = "relative-eu"
    absolute_scheme: str | None = "absolute-go1"
    intensity_g_per_kwh: float = 475.0
    calib: CalibSpec = CalibSpec()
    seeds: dict[str, int] = {}
    gate: Gate | None = None
    source: str | None = None
    apply_report: ApplyReport | None = None
    dtype: str | None = None


class ExportManifest(Record):
    """``greenopt_export.json``: everything needed to reload, reproduce and re-verify an export."""

    format_version: Literal[1] = 1
    greenopt_version: str
    date: str
    base_model: str
    base_model_id: str
    variant: Variant
    variant_name: str
    variant_info: VariantInfo
    loader: Literal["transformers", "greenopt"]
    loader_reason: str
    dtype: str
    protocol: Protocol | None
    card_protocol_id: str | None
    eval: EvalSpec | None
    relative_scheme: str
    absolute_scheme: str | None
    intensity_g_per_kwh: float
    calib: CalibSpec
    seeds: dict[str, int]
    libraries: dict[str, str]
    weights_sha256: str
    apply_report: ApplyReport | None
    gate: Gate | None
    source: str | None
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- export


def export(model: torch.nn.Module, tokenizer: Any, variant: Variant, card: LabelCard | None,
           out_dir: str | Path, force: bool = False, *, provenance: ExportProvenance | None = None,
           check_reload: bool = False) -> ExportManifest:
    """Writes ``model`` (with ``variant`` applied) as a self-describing checkpoint folder.

    Args:
        model: the compressed in-memory causal LM (not modified).
        tokenizer: its tokenizer, saved beside the weights.
        variant: the variant that produced ``model`` from the base model.
        card: the variant's label card, or None when it has not been measured (``apply``).
        out_dir: the folder to create.
        force: replace an existing greenopt export at ``out_dir``.
        provenance: base model, protocol, tasks, schemes and seeds for the manifest
            (default: taken from the card where possible).
        check_reload: reload the written folder and compare its logits with ``model``'s
            before putting it in place.

    Returns:
        The manifest written as ``greenopt_export.json``.

    Raises:
        ConfigError: ``out_dir`` exists (without ``force``, or not a greenopt export), or the
            model holds a module greenopt cannot serialize (checked before writing).
    """
    out = Path(out_dir)
    _check_target(out, force)
    plan = em.plan_weights(model)
    prov = provenance or ExportProvenance(base_model=card.model_id if card else "unknown")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        em.write_weights(model, plan, tmp)
        tokenizer.save_pretrained(tmp)
        manifest = _manifest(model, variant, card, prov, plan, tmp)
        if card is not None:
            write_card(card, tmp)
        write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
        write_readme(tmp, card, manifest)
        if check_reload:
            _check_reload(model, tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s loader) to %s", manifest.variant_name, manifest.loader, out)
    return manifest


def _check_target(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it or choose another --out")
    if not out.is_dir():
        raise ConfigError(f"{out} is a file, not an export folder; remove it or choose another --out")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ConfigError(f"{out} is not a greenopt export (no {MANIFEST}); refusing to replace it even "
                          "with --force; choose another --out")


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
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


def files_sha256(folder: str | Path) -> str:
    """SHA-256 over the tensors of every ``*.safetensors`` file in ``folder``.

    Hashes file name, tensor name, dtype, shape and bytes in sorted order; the files' JSON
    headers are left out (safetensors writes their metadata in no fixed order).
    """
    from safetensors import safe_open

    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("*.safetensors")):
        h.update(p.name.encode() + b"\0")
        with safe_open(str(p), framework="pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key).contiguous()
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode() + b"\0")
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _manifest(model, variant: Variant, card: LabelCard | None, prov: ExportProvenance,
              plan: em.WeightsPlan, folder: Path) -> ExportManifest:
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
    dtype = prov.dtype or str(next(model.parameters()).dtype).replace("torch.", "")
    seeds = {"calibration": prov.calib.seed, **({"protocol": prov.protocol.seed} if prov.protocol else {}),
             **({"eval": prov.eval.seed} if prov.eval else {}), **prov.seeds}
    return ExportManifest(
        greenopt_version=__version__, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        base_model=prov.base_model, base_model_id=prov.base_model_id or (card.model_id if card else prov.base_model),
        variant=variant, variant_name=name, variant_info=info, loader=plan.loader, loader_reason=plan.reason,
        dtype=dtype, protocol=prov.protocol, card_protocol_id=card.protocol_id if card else None,
        eval=prov.eval, relative_scheme=_scheme_ref(folder, card, "relative", prov.relative_scheme),
        absolute_scheme=_scheme_ref(folder, card, "absolute", prov.absolute_scheme),
        intensity_g_per_kwh=card.carbon.intensity_g_per_kwh if card else prov.intensity_g_per_kwh,
        calib=prov.calib, seeds=seeds, libraries=_libraries(), weights_sha256=files_sha256(folder),
        apply_report=prov.apply_report, gate=prov.gate, source=prov.source, notes=plan.notes,
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


def load(folder: str | Path, *, device: str = "cpu", dtype: str | None = None) -> torch.nn.Module:
    """Loads an exported checkpoint, whichever loader it needs, in eval mode.

    Args:
        folder: the export folder (or any transformers checkpoint folder).
        device: ``cpu`` or ``cuda[:N]``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the dense parts (default: as saved).

    Returns:
        The model; its tokenizer loads with ``AutoTokenizer.from_pretrained(folder)``.

    Raises:
        ConfigError: the folder holds no loadable checkpoint.
    """
    folder = Path(folder)
    if (folder / em.MODULES).is_file():
        return em.load_greenopt(folder, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": device} if device != "cpu" else {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise ConfigError(f"{folder}: no loadable checkpoint ({str(e).splitlines()[0]})") from None
    return model.to(device).eval() if device == "cpu" else model.eval()


# ---------------------------------------------------------------------------- README


def write_readme(folder: str | Path, card: LabelCard | None, manifest: ExportManifest | None) -> Path:
    """Writes (or updates) ``README.md``: front matter, then greenopt's section between markers.

    Text outside the markers (a user's own model card) is kept on re-rendering.
    """
    path = Path(folder) / README
    section = "\n".join([_BEGIN, render_readme_section(card, manifest), _END])
    if path.is_file() and _BEGIN in (old := path.read_text(encoding="utf-8")) and _END in old:
        head, rest = old.split(_BEGIN, 1)
        text = head + section + rest.split(_END, 1)[1]
    else:
        base = manifest.base_model_id if manifest else (card.model_id if card else "unknown")
        text = (f"---\nlibrary_name: transformers\nbase_model: {base}\ntags:\n- greenopt\n- energy-label\n---\n\n"
                f"{section}\n")
    write_text(path, text)
    return path


def render_readme_section(card: LabelCard | None, m: ExportManifest | None) -> str:
    """The model-card section: class, J/token, device, runtime, accuracy, carbon, versions, loader."""
    out = ["## Energy label (greenopt)", ""]
    if m is not None:
        out += [f"Base model `{m.base_model_id}`, variant `{m.variant_name}` (hash `{m.variant.hash}`).", ""]
    if card is None:
        out += ["**Not measured.** This variant was applied without an energy measurement; run "
                "`greenopt verify DIR --target X` (or `greenopt measure`) to label it.", ""]
    else:
        c, r, d = card.candidate, card.runtime, card.device
        est = " — an estimate, not a counter reading" if card.estimated else ""
        out += [f"- **Relative class: {card.relative.display}** (EEI {card.relative.value:.1f}, 95% CI "
                f"{card.relative.interval[0]:.1f}–{card.relative.interval[1]:.1f}; scheme "
                f"{card.relative.scheme} v{card.relative.scheme_version})",
                "- Absolute: " + (f"class {card.absolute.display} ({card.absolute.scheme} v{card.absolute.scheme_version})"
                                   if card.absolute else f"not graded ({card.absolute_note})"),
                f"- J/token: {c.joules_per_token:.4g} (95% CI {c.joules_per_token_ci[0]:.4g}–"
                f"{c.joules_per_token_ci[1]:.4g}), tier {card.tier}{est}; baseline {card.baseline.joules_per_token:.4g}",
                f"- Device: {d.name} ({d.kind}); boundary {d.boundary}; meter {d.meter}",
                f"- Runtime: torch {r.torch}, transformers {r.transformers}, {r.attention}, {r.dtype}, batch "
                f"{r.batch_size}, {r.prompt_tokens} prompt + {r.new_tokens} new tokens",
                f"- Carbon: {card.carbon.g_per_1k_tokens:.3g} gCO2e per 1000 tokens at "
                f"{card.carbon.intensity_g_per_kwh:g} g/kWh", "",
                "| task | metric | variant | baseline | drop | n |", "|---|---|---|---|---|---|"]
        out += [f"| {t.task} | {t.metric} | {t.value:.4g} | {t.baseline:.4g} | {t.drop:+.4g} | {t.n} |"
                for t in card.accuracy] or ["| (no task evaluated) | | | | | |"]
        out += ["", f"Protocol {card.protocol_id}; label card v{card.card_version}; measured {card.date} "
                f"with greenopt {card.greenopt_version}. Full card: `LABEL.md`, `label.svg`, `label.json`."]
    if m is not None:
        how = ("`transformers.AutoModelForCausalLM.from_pretrained(DIR)`" if m.loader == "transformers"
               else "`greenopt.load(DIR)` (transformers cannot load it: " + m.loader_reason + ")")
        out += ["", f"Load with {how}; tokenizer with `AutoTokenizer.from_pretrained(DIR)`. "
                f"Exported {m.date} by greenopt {m.greenopt_version}; weights SHA-256 `{m.weights_sha256[:16]}…`."]
    return "\n".join(out)


# ---------------------------------------------------------------------------- from a search run


def export_run(run_dir: str | Path, out_dir: str | Path, *, pick: str | int = "best", force: bool = False,
               check_reload: bool = False, device: str = "cpu", progress: Any = None) -> ExportManifest:
    """Exports a trial of a finished search (``runs/NAME/``) with its measured label card.

    The variant is re-applied to the base model named in ``search.yaml`` (moves are seeded, so
    the weights are those that were measured; the apply report must match the trial's), and
    the card is built from the trial record's comparison and evaluation beside the baseline
    trial's.

    Args:
        run_dir: the search's run folder.
        out_dir: the export folder to create.
        pick: ``"best"`` (the chosen trial) or a trial number.
        force: replace an existing export at ``out_dir``.
        check_reload: reload and compare logits before putting the export in place.
        device: where to re-apply the variant; calibrated moves (GPTQ, Wanda, width, depth,
            MoE) should run on the device kind the search used, so the weights match.
        progress: ``progress(stage, done, total)`` callback.

    Returns:
        The export manifest.

    Raises:
        ConfigError: no such run or trial, the trial was not measured, or re-applying does not
            reproduce the trial's model.
    """
    rd = RunDir(Path(run_dir))
    if not rd.spec.is_file():
        raise ConfigError(f"{run_dir}: not a search run folder (no search.yaml)")
    spec = validated(SearchSpec, load_yaml(rd.spec), where=str(rd.spec))
    recs = {r.number: r for r in run_records(rd, spec)}
    number = _picked(rd, spec, recs, pick)
    rec = recs.get(number)
    if rec is None or not rec.measured:
        raise ConfigError(f"{run_dir}: trial {number} has no full measurement (state "
                          f"{rec.state if rec else 'missing'}); pick a COMPLETE trial from the front table")
    base = next((r for r in sorted(recs.values(), key=lambda r: (r.device != rec.device, r.number))
                 if r.is_baseline and r.measured), None)
    if base is None:
        raise ConfigError(f"{run_dir}: the baseline trial has no evaluation; the card needs its accuracy")
    env = json.loads(rd.environment.read_text()) if rd.environment.is_file() else {}
    dtype = spec.dtype if spec.dtype != "auto" else str(env.get("dtype") or "float32")
    model, tok, info = load_model(spec.model, dtype=dtype, device=device)
    report = apply(model, rec.variant, tokenizer=tok, calib=spec.calib, progress=progress)
    if rec.apply is not None and (report.params_after, report.weight_bytes_after) != (
            rec.apply.params_after, rec.apply.weight_bytes_after):
        raise ConfigError(f"re-applying trial {number} gives {report.weight_bytes_after} weight bytes, the trial had "
                          f"{rec.apply.weight_bytes_after}; the moves or libraries changed since the search")
    protocol = protocol_preset(spec.fidelity.protocol)
    relative, absolute = ((spec.scheme, "absolute-go1") if _is_relative(spec.scheme) else ("relative-eu", spec.scheme))
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    name = rec.variant.name or f"{spec.run_name}-trial{number}"
    card = build_card(model_id=info.model_id, variant_name=name, variant_hash=rec.variant.hash,
                      comparison=rec.comparison, candidate_eval=rec.eval, baseline_eval=base.eval,
                      runtime=current_runtime(protocol, attention, dtype), relative_scheme=relative,
                      absolute_scheme=absolute, apply_report=report, date=rec.started or None)
    gate = Gate(target=spec.target if _is_relative(spec.scheme) else None, max_drop=spec.max_drop)
    prov = ExportProvenance(base_model=spec.model, base_model_id=info.model_id, protocol=protocol,
                            eval=spec.fidelity.eval, relative_scheme=relative, absolute_scheme=absolute,
                            calib=spec.calib, seeds={"search": spec.seed}, gate=gate,
                            source=f"{rd.root} trial {number}", apply_report=report, dtype=dtype)
    variant = rec.variant.model_copy(update={"name": name})
    return export(model, tok, variant, card, out_dir, force, provenance=prov, check_reload=check_reload)


def _is_relative(scheme: str) -> bool:
    return load_scheme(scheme).metric == "eei"


def run_records(rd: RunDir, spec: SearchSpec) -> list[TrialRecord]:
    """The trial records of a run, read from its study (the source of truth).

    The study is the run's sqlite file or ``spec.storage`` (a shared RDB where ``greenopt
    worker`` processes on other machines recorded their trials); ``trials/*.json`` is only a
    cache of it and is never read here.

    Raises:
        ConfigError: the study cannot be found or opened.
    """
    url = spec.storage or rd.sqlite_url
    if spec.storage is None and not rd.study_db.is_file():
        raise ConfigError(f"{rd.root}: no study ({rd.study_db.name} is missing); export reads the trials from "
                          "the study, so copy the whole run folder, or pass the run's --storage")
    storage = study_storage.open_storage(url, shared=spec.storage is not None, heartbeat_s=spec.heartbeat_interval_s)
    try:
        study = optuna.load_study(study_name=spec.resolved_study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"{rd.root}: no study {spec.resolved_study_name!r} in {study_storage.redact(url)}") from None
    return records(study)


def _picked(rd: RunDir, spec: SearchSpec, recs: dict[int, TrialRecord], pick: str | int) -> int:
    if str(pick) != "best":
        try:
            return int(pick)
        except ValueError:
            raise ConfigError(f"--pick {pick!r}: give a trial number or 'best'") from None
    chosen = pareto.select(recs.values(), load_scheme(spec.scheme), spec.target, spec.max_drop)
    if chosen is not None:
        return chosen.number
    raise ConfigError(f"{rd.root}: the search chose no variant (target not reached); pick a trial from the "
                      "front table with --pick N")


