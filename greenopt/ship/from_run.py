"""Export a search trial: read the trial from the run's study, rebuild its variant on the
base model, and export it with a label card built from the trial's own measurement."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc

from greenopt.compress import apply
from greenopt.config import SearchSpec, Variant, load_yaml, protocol_preset, validated
from greenopt.config.recipe import Gate
from greenopt.errors import ConfigError
from greenopt.label import goal, load_scheme
from greenopt.label.card import build_card, current_runtime
from greenopt.models import load_model
from greenopt.records import ExportManifest, TrialRecord
from greenopt.runtimes import Runtime, TransformersRuntime, cast, realise
from greenopt.search import pareto, records
from greenopt.search import storage as study_storage
from greenopt.search.rundir import RunDir
from greenopt.ship.exporter import ExportProvenance, export

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out_dir: str | Path, *, pick: str | int = "best", force: bool = False,
               check_reload: bool = False, device: str = "cpu", progress: Any = None) -> ExportManifest:
    """Exports a trial of a finished search (``runs/NAME/``) with its measured label card.

    The variant is re-applied to the base model named in ``search.yaml`` as the search applied
    it (cast to the deploy's dtype, then the seeded moves, so the weights are those that were
    measured; the apply report must match the trial's) and realised on its runtime: a
    transformers deployment ships the weights in the deployed dtype, ONNX Runtime GenAI its built
    model. The card is built from the trial record's comparison and evaluation beside the
    baseline trial's, naming both runtimes.

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
    dtype = spec.dtype if spec.dtype != "auto" else str(_environment(rd).get("dtype") or "float32")
    model, tok, info = load_model(spec.model, dtype=dtype, device=device)
    baseline_runtime = TransformersRuntime(model, tok).describe()
    cast(model, rec.variant.deploy)  # as the search did: the steps see the deployment's dtype
    report = apply(model, rec.variant, tokenizer=tok, calib=spec.calib, progress=progress)
    if rec.apply is not None and (report.params_after, report.weight_bytes_after) != (
            rec.apply.params_after, rec.apply.weight_bytes_after):
        raise ConfigError(f"re-applying trial {number} gives {report.weight_bytes_after} weight bytes, the trial had "
                          f"{rec.apply.weight_bytes_after}; the moves or libraries changed since the search")
    runtime = _deployed(model, tok, rec.variant)
    protocol = protocol_preset(spec.fidelity.protocol)
    relative, absolute = ((spec.scheme, "absolute-go1") if _is_relative(spec.scheme) else ("relative-eu", spec.scheme))
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    deployed = runtime.describe()
    name = rec.variant.name or f"{spec.run_name}-trial{number}"
    card = build_card(model_id=info.model_id, variant_name=name, variant_hash=rec.variant.hash,
                      comparison=rec.comparison, candidate_eval=rec.eval, baseline_eval=base.eval,
                      runtime=current_runtime(protocol, attention, deployed.dtype).model_copy(
                          update={"deployed": deployed, "baseline": baseline_runtime}), relative_scheme=relative,
                      absolute_scheme=absolute, apply_report=report, date=rec.started or None)
    gate = Gate(target=spec.target if _is_relative(spec.scheme) else None, max_drop=spec.max_drop)
    prov = ExportProvenance(base_model=spec.model, base_model_id=info.model_id, protocol=protocol,
                            eval=spec.fidelity.eval, relative_scheme=relative, absolute_scheme=absolute,
                            calib=spec.calib, seeds={"search": spec.seed}, gate=gate,
                            source=f"{rd.root} trial {number}", apply_report=report, dtype=dtype)
    variant = rec.variant.model_copy(update={"name": name})
    return export(model, tok, variant, card, out_dir, force, provenance=prov, check_reload=check_reload,
                  runtime=runtime)


def _deployed(model, tok, variant: Variant) -> Runtime:
    """The trial's runtime again. Transformers wraps the cast model without the kernel check
    (writing bf16 weights needs no bf16 kernels here); another runtime builds its artifact."""
    if variant.deploy.runtime == "transformers":
        return TransformersRuntime(cast(model, variant.deploy), tok, compiled=variant.deploy.compile)
    return realise(model, tok, variant.deploy, steps=variant.steps)


def _is_relative(scheme: str) -> bool:
    return load_scheme(scheme).metric == "eei"


def _environment(rd: RunDir) -> dict[str, Any]:
    """``environment.json`` (the search's dtype); a missing or unreadable one is skipped with a warning."""
    if not rd.environment.exists():
        return {}
    try:
        env = json.loads(rd.environment.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        log.warning("%s ignored (%s); assuming the search ran in float32", rd.environment, e)
        return {}
    return env if isinstance(env, dict) else {}


def run_records(rd: RunDir, spec: SearchSpec) -> list[TrialRecord]:
    """The trial records of a run, read from its study (the source of truth).

    The study is the run's sqlite file or ``spec.storage`` (a shared RDB where ``greenopt
    worker`` processes on other machines recorded their trials); ``trials/*.json`` is only a
    cache of it and is never read here, so a corrupt or missing trial file does not matter.

    Raises:
        ConfigError: the study cannot be found, opened or read (a corrupt ``study.db``).
    """
    url = spec.storage or rd.sqlite_url
    if spec.storage is None and not rd.study_db.is_file():
        raise ConfigError(f"{rd.root}: no study ({rd.study_db.name} is missing); export reads the trials from "
                          "the study, so copy the whole run folder, or pass the run's --storage")
    try:
        storage = study_storage.open_storage(url, shared=spec.storage is not None,
                                             heartbeat_s=spec.heartbeat_interval_s)
        study = optuna.load_study(study_name=spec.resolved_study_name, storage=storage)
        return records(study)
    except KeyError:
        raise ConfigError(f"{rd.root}: no study {spec.resolved_study_name!r} in {study_storage.redact(url)}") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        why = str(getattr(e, "orig", None) or type(e).__name__).splitlines()[0]
        fix = (f"restore {rd.study_db.name} from a copy of the run" if spec.storage is None
               else "check that the storage is reachable")
        raise ConfigError(f"{rd.root}: cannot read the study in {study_storage.redact(url)} ({why}); {fix}") from None


def _picked(rd: RunDir, spec: SearchSpec, recs: dict[int, TrialRecord], pick: str | int) -> int:
    if str(pick) != "best":
        try:
            return int(pick)
        except ValueError:
            raise ConfigError(f"--pick {pick!r}: give a trial number or 'best'") from None
    chosen = pareto.select(recs.values(), goal(spec.scheme, spec.target, spec.max_drop))
    if chosen is not None:
        return chosen.number
    raise ConfigError(f"{rd.root}: the search chose no variant (target not reached); pick a trial from the "
                      "front table with --pick N")
