"""The CI gate: re-measure an export (or a pinned recipe) and check it still earns its label.

``verify(VerifySpec(source="exports/int4", target="B", max_drop=0.01))`` re-measures the
variant's J/token against its baseline and re-evaluates its accuracy (through
:func:`greenopt.assess.assess`), then :func:`check_gate` decides. The gate cannot pass
vacuously: weights that changed since export (their SHA-256 against the manifest's, checked
before measuring), no measurement, a tier below the one demanded, a protocol other than the
recorded one, or a missing task is a failure, never a pass.

Example:
    >>> from greenopt.ship.gate import VerifySpec, verify
    >>> result = verify(VerifySpec(source="exports/int4", target="B", max_drop=0.01))  # doctest: +SKIP
    >>> result.passed, result.reason                                                     # doctest: +SKIP
    (False, 'class C (B-C): its worse end C is worse than the target B')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import Field

from greenopt.assess import AssessSpec, assess
from greenopt.config import (
    DeviceSpec,
    DType,
    EvalSpec,
    Protocol,
    ProtocolRef,
    Variant,
    as_protocol,
)
from greenopt.config.recipe import load_recipe
from greenopt.errors import ConfigError
from greenopt.records import TIER_ORDER, GateResult, LabelCard, Record, TaskLine, Tier
from greenopt.ship.exporter import MANIFEST, WEIGHT_FILES, files_sha256, load_manifest

Progress = Callable[[str, int, int], None]
_EPS = 1e-12


# ---------------------------------------------------------------------------- the pure gate


def task_drop(line: TaskLine) -> float:
    """The drop the accuracy budget is compared with, for one task.

    Accuracy-like scores (higher is better): ``baseline - value`` in absolute units, so
    0.01 is one percentage point. Lower-is-better scores (perplexity): the relative increase
    ``(value - baseline) / baseline``, so 0.01 is 1% worse perplexity.
    """
    if line.higher_is_better:
        return line.baseline - line.value
    if line.baseline <= 0:
        return math.inf if line.value > line.baseline else 0.0
    return (line.value - line.baseline) / line.baseline


def _measurement_failures(card: LabelCard) -> list[str]:
    out = []
    for side, s in (("variant", card.candidate), ("baseline", card.baseline)):
        if s.trials < 1:
            out.append(f"no measurement: the {side} has no protocol trials")
        elif not (math.isfinite(s.joules_per_token) and s.joules_per_token > 0):
            out.append(f"no measurement: the {side}'s J/token is {s.joules_per_token!r}")
    if not all(math.isfinite(x) for x in (card.relative.value, *card.relative.interval)):
        out.append("no measurement: the EEI is not a finite number")
    return out


def _tier_failures(card: LabelCard, required: Tier | None, allow_estimate: bool) -> list[str]:
    why = f" (failed checks: {', '.join(card.flags)})" if card.flags else ""
    if card.tier == "E1" and not allow_estimate:
        return [(f"tier E1 is an estimate{why}, not an energy reading; verify where an energy counter can be "
                 "read (RAPL, NVML; see greenopt env), or pass --allow-estimate to accept an estimate")]
    if required is None or TIER_ORDER.index(card.tier) <= TIER_ORDER.index(required):
        return []
    what = "an estimate" if card.tier == "E1" else "sampled power" if card.tier == "M2" else "a counter"
    return [f"tier {card.tier} is {what}{why}, but tier {required} or better is required"]


def _class_failures(card: LabelCard, target: str) -> list[str]:
    letters = card.relative_scheme.letters
    if target not in letters:
        return [(f"target class {target!r} is not in scheme {card.relative_scheme.name} "
                 f"(classes {', '.join(letters)})")]
    worst = card.relative.worst_letter
    if letters.index(worst) > letters.index(target):
        return [f"class {card.relative.display}: its worse end {worst} is worse than the target {target}"]
    return []


def _accuracy_failures(card: LabelCard, max_drop: float | None,
                       expected_tasks: Sequence[str]) -> tuple[list[str], dict[str, float]]:
    out, drops = [], {}
    lines = {t.task: t for t in card.accuracy}
    if max_drop is not None and not expected_tasks:
        out.append("an accuracy budget was given but no task is expected; name the tasks to check")
    for task in expected_tasks:
        line = lines.get(task)
        if line is None:
            out.append(f"task {task} is missing from the evaluation")
            continue
        if line.n < 1 or not (math.isfinite(line.value) and math.isfinite(line.baseline)):
            out.append(f"task {task} has no usable score (n={line.n}, value={line.value!r})")
            continue
        drops[task] = task_drop(line)
        if max_drop is not None and drops[task] > max_drop + _EPS:
            unit = "relative increase" if not line.higher_is_better else "drop"
            out.append(f"task {task}: accuracy {unit} {drops[task]:.4g} exceeds the budget {max_drop:g} "
                       f"({line.metric} {line.value:.4g} vs baseline {line.baseline:.4g}, n={line.n})")
    return out, drops


def check_gate(card: LabelCard | None, target: str, max_drop: float | None, required_tier: Tier | None,
               expected_protocol: str | None, expected_tasks: Sequence[str], *,
               allow_estimate: bool = False) -> GateResult:
    """Decides whether a measured label card passes the gate. Pure: no model, no I/O.

    Checks, all of which must hold: a measurement exists (trials and finite J/token on both
    sides); the protocol id equals ``expected_protocol``; the tier is ``required_tier`` or
    better (M1 > M2 > E1), and never E1 unless ``allow_estimate``; the worse end of the relative
    class interval is ``target`` or
    better; every expected task was evaluated; and each task's drop (see :func:`task_drop`)
    is at most ``max_drop``.

    Args:
        card: the label card of the re-measured variant, or None when nothing was measured.
        target: the worst acceptable relative class letter, e.g. ``"B"``.
        max_drop: the accuracy budget per task (0.01 = one point), or None for no budget.
        required_tier: the weakest acceptable tier, or None for any measured one (M1, M2).
        allow_estimate: accept a tier-E1 estimate (the pass line repeats that it did).
        expected_protocol: the protocol id recorded with the export or recipe (e.g.
            ``"GO-1/b1"``); None skips the check.
        expected_tasks: tasks that must appear on the card.

    Returns:
        The verdict, with every failed check and a one-line reason.
    """
    base = {"target": target, "max_drop": max_drop, "required_tier": required_tier,
            "allow_estimate": allow_estimate}
    if card is None:
        return GateResult(passed=False, reason="no measurement: there is no label card to check",
                          failures=("no measurement: there is no label card to check",), **base)
    failures = _measurement_failures(card)
    if expected_protocol is not None and card.protocol_id != expected_protocol:
        failures.append(f"protocol changed: measured under {card.protocol_id}, "
                        f"but {expected_protocol} was recorded")
    failures += _tier_failures(card, required_tier, allow_estimate)
    failures += _class_failures(card, target)
    acc_failures, drops = _accuracy_failures(card, max_drop, tuple(expected_tasks))
    failures += acc_failures
    facts = {"display": card.relative.display, "worst_letter": card.relative.worst_letter, "tier": card.tier,
             "protocol_id": card.protocol_id, "task_drops": drops, "card": card}
    if failures:
        return GateResult(passed=False, reason=failures[0], failures=tuple(failures), **base, **facts)
    return GateResult(passed=True, reason=_pass_line(card, target, max_drop, drops), **base, **facts)


def _pass_line(card: LabelCard, target: str, max_drop: float | None, drops: dict[str, float]) -> str:
    est = (" (estimated: tier E1, not an energy reading; accepted because of --allow-estimate)"
           if card.tier == "E1" else "")
    acc = "accuracy not gated"
    if max_drop is not None:
        worst = max(drops.items(), key=lambda kv: kv[1])
        acc = f"largest drop {worst[1]:.4g} ({worst[0]}) <= {max_drop:g} on {', '.join(drops)}"
    return (f"class {card.relative.display} meets target {target}{est}; EEI {card.relative.value:.1f}; "
            f"tier {card.tier}; {acc}; protocol {card.protocol_id}")


# ---------------------------------------------------------------------------- the verb


class VerifySpec(DeviceSpec):
    """What to verify and against what. ``None`` fields come from the export or recipe.

    ``source`` is an export folder (written by ``greenopt export``/``apply``) or a recipe
    file that pins a variant. ``protocol`` may only name the recorded protocol again: a
    different one fails the gate. Where it runs comes from
    :class:`~greenopt.config.runtime.DeviceSpec`; ``dtype=None`` and ``"auto"`` fields take the
    recorded choice.
    """

    source: str
    target: str | None = None
    max_drop: float | None = Field(None, ge=0)
    require_tier: Tier | None = None
    allow_estimate: bool | None = None
    protocol: ProtocolRef | None = None
    tasks: tuple[str, ...] | None = None
    limit: int | None = Field(None, ge=1)
    include_path: str | None = None  # the user's own lm-eval tasks (default: the recorded folder)
    baseline: str | None = None
    dtype: DType | None = None


class _Plan(Record):
    """What verify resolved from the source before measuring anything: the assessment to run
    and the gate to hold it to."""

    assess: AssessSpec
    is_export: bool
    expected_protocol: str
    target: str
    max_drop: float | None
    require_tier: Tier | None
    allow_estimate: bool = False
    export_dir: str | None = None  # an export folder: its weights are re-hashed before measuring
    loader: str = "transformers"  # the export's loader, which says which files weights_sha256 covers
    weights_sha256: str | None = None


def verify(spec: VerifySpec, *, progress: Progress | None = None) -> GateResult:
    """Re-measures and re-evaluates the source, then applies :func:`check_gate`.

    An export folder is loaded as shipped (transformers, or ``greenopt.load`` when its
    manifest says so, in the baseline's dtype and then cast to the variant's deploy dtype; an
    ONNX Runtime GenAI or llama.cpp export is its artifact, run by that runtime) and measured against the
    recorded base model on transformers; a recipe's pinned variant is applied to its model in
    memory. The protocol, tasks, item limit and label schemes are
    the recorded ones unless overridden; a protocol other than the recorded one fails, and so
    does an export whose weights no longer hash to the manifest's ``weights_sha256`` (both
    before anything is measured).

    Args:
        spec: the source, the gate (target class, accuracy budget, tier) and the meter.
        progress: ``progress(stage, done, total)`` callback for progress bars.

    Returns:
        The verdict; ``passed`` False with a one-line ``reason`` on any failed check.

    Raises:
        GreenoptError: the source is unreadable or the inputs are invalid (before measuring).
    """

    plan = _plan(spec)
    changed = _weights_changed(plan)
    if changed is not None:
        return _refused(plan, changed)
    protocol = plan.assess.resolved_protocol()
    if protocol.id != plan.expected_protocol:
        return _refused(plan, f"protocol changed: asked to measure under {protocol.id}, "
                              f"but {plan.expected_protocol} was recorded")
    if plan.max_drop is not None and plan.assess.eval is None:
        raise ConfigError("an accuracy budget (--max-drop) needs tasks; pass --tasks or record them in the recipe")
    result = assess(plan.assess, progress=progress)
    card = _relabel(result.card, plan) if plan.is_export else result.card
    tasks = plan.assess.eval.tasks if plan.assess.eval is not None else ()
    return check_gate(card, plan.target, plan.max_drop, plan.require_tier, plan.expected_protocol, tasks,
                      allow_estimate=plan.allow_estimate)


def _refused(plan: _Plan, reason: str) -> GateResult:
    """A gate failed before anything was measured."""
    return GateResult(passed=False, reason=reason, failures=(reason,), target=plan.target,
                      max_drop=plan.max_drop, required_tier=plan.require_tier, allow_estimate=plan.allow_estimate)


def _weights_changed(plan: _Plan) -> str | None:
    """Why an export's weights are not the exported ones (None: they are, or not an export)."""
    if plan.weights_sha256 is None or plan.export_dir is None:
        return None
    folder = plan.export_dir
    try:
        actual = files_sha256(folder, plan.loader)
    except Exception as e:  # noqa: BLE001 - an unreadable weights file is a changed one
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"weights changed since export: the weights in {folder} cannot be read ({first})"
    if actual == plan.weights_sha256:
        return None
    names = sorted({p.name for pattern in WEIGHT_FILES[plan.loader] for p in Path(folder).glob(pattern)})
    files = ", ".join(f"{folder}/{n}" for n in names) or f"{folder}/{' and '.join(WEIGHT_FILES[plan.loader])}"
    return (f"weights changed since export: {files} sha256 {actual[:16]}… != recorded "
            f"{plan.weights_sha256[:16]}… ({MANIFEST}); re-export the variant or restore the weight files")


def _relabel(card: LabelCard, plan: _Plan) -> LabelCard:
    """An export is measured as a plain model; put the recorded model id and variant back on the card."""

    m = load_manifest(plan.export_dir)
    return card.model_copy(update={"model_id": m.base_model_id, "variant": m.variant_info})


def _plan(spec: VerifySpec) -> _Plan:
    src = Path(spec.source)
    if src.is_dir():
        return _plan_export(spec, src)
    if src.is_file():
        return _plan_recipe(spec, src)
    raise ConfigError(f"{spec.source}: no such export folder or recipe file")


def _resolve_protocol(p: Protocol | str | None) -> Protocol | None:
    return None if p is None else as_protocol(p)


def _device(spec: VerifySpec, recorded: dict) -> dict:
    """Where verify runs: each flag the user set, else the recorded choice."""
    return {"dtype": spec.dtype if spec.dtype not in (None, "auto") else recorded.get("dtype", "auto"),
            "device": spec.device if spec.device != "auto" else recorded.get("device", "auto"),
            "meter": spec.meter if spec.meter != "auto" else recorded.get("meter", "auto"),
            "cpu_watts": spec.cpu_watts or recorded.get("cpu_watts"), "threads": spec.threads}


def _eval_spec(recorded: EvalSpec | None, spec: VerifySpec) -> EvalSpec | None:
    if spec.tasks is not None and not spec.tasks:
        return None
    if recorded is None and spec.tasks is None:
        return None
    base = recorded or EvalSpec()
    update = {k: v for k, v in (("tasks", spec.tasks), ("limit", spec.limit), ("include_path", spec.include_path))
              if v is not None}
    return base.model_copy(update=update) if update else base


def _gate_target(flag: str | None, recorded: str | None, where: str) -> str:
    target = flag or recorded
    if target is None:
        raise ConfigError(f"no target class: pass --target (e.g. --target B) or set gate.target in {where}")
    return target


def _plan_export(spec: VerifySpec, folder: Path) -> _Plan:
    m = load_manifest(folder)
    recorded = m.card_protocol_id or (m.protocol.id if m.protocol else None)
    protocol = _resolve_protocol(spec.protocol) or m.protocol
    if protocol is None:
        raise ConfigError(f"{folder}: the export records no protocol; pass --protocol")
    gate = m.gate
    base = spec.baseline or m.base_model
    # The export is the variant's steps applied; re-applying its deploy (dtype on transformers, or
    # loading the runtime's artifact) puts the candidate back on the runtime it was measured on.
    sides = ({"model": base, "artifact": str(folder)} if m.loader not in ("transformers", "greenopt")
             else {"model": str(folder), "baseline": base})
    run = AssessSpec(
        **sides, variant=Variant(deploy=m.variant.deploy), protocol=protocol,
        eval=_eval_spec(m.eval, spec), relative_scheme=_in_export(folder, m.relative_scheme),
        absolute_scheme=_in_export(folder, m.absolute_scheme), intensity_g_per_kwh=m.intensity_g_per_kwh,
        trust_remote_code=False, **_device(spec, {"dtype": m.dtype}))
    return _Plan(
        assess=run, is_export=True, expected_protocol=recorded or protocol.id,
        target=_gate_target(spec.target, gate.target if gate else None, str(folder)),
        max_drop=spec.max_drop if spec.max_drop is not None else (gate.max_drop if gate else None),
        require_tier=spec.require_tier or (gate.require_tier if gate else None),
        allow_estimate=_allow(spec.allow_estimate, gate.allow_estimate if gate else False),
        export_dir=str(folder), loader=m.loader, weights_sha256=m.weights_sha256,
    )


def _in_export(folder: Path, scheme: str | None) -> str | None:
    """A scheme file copied into the export resolves there; a shipped name stays a name."""
    if scheme is not None and (folder / scheme).is_file():
        return str(folder / scheme)
    return scheme


def _plan_recipe(spec: VerifySpec, path: Path) -> _Plan:
    r = load_recipe(path)
    if r.variant is None:
        raise ConfigError(f"{path}: this recipe runs a search; verify its export folder "
                          "(greenopt verify EXPORT_DIR) or pin the chosen variant under 'variant:'")
    protocol = r.resolved_protocol()
    asked = _resolve_protocol(spec.protocol) or protocol
    gate_target = r.gate.target or (r.search.target if r.search is not None else None)
    recorded = {"dtype": r.model.dtype, "device": r.model.device, "meter": r.measurement.meter,
                "cpu_watts": r.measurement.cpu_watts}
    run = AssessSpec(
        model=r.model.id, baseline=spec.baseline or r.model.id, variant=r.variant, calib=r.calibration,
        protocol=asked, eval=_eval_spec(r.evaluation.eval_spec(), spec), trust_remote_code=r.model.trust_remote_code,
        **r.label_spec().model_dump(), **_device(spec, recorded))
    if spec.threads is None and r.measurement.threads is not None:
        run = run.model_copy(update={"threads": r.measurement.threads})
    return _Plan(
        assess=run, is_export=False, expected_protocol=protocol.id,
        target=_gate_target(spec.target, gate_target, str(path)),
        max_drop=spec.max_drop if spec.max_drop is not None else r.gate.max_drop,
        require_tier=spec.require_tier or r.gate.require_tier,
        allow_estimate=_allow(spec.allow_estimate, r.gate.allow_estimate),
    )


def _allow(flag: bool | None, recorded: bool) -> bool:
    return recorded if flag is None else flag
