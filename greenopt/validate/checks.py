"""Recipe rules that span fields, and the architecture check on the ``meta`` device.

``cross_field_issues(recipe)`` checks schemes and target letters, tier versus meter, tasks,
bits and group sizes per method and, when the model's config is readable without downloading,
the pinned variant, or every value of every search dimension, against the real architecture
built on the ``meta`` device (no memory, no work).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from greenopt import offline
from greenopt.compress import ApplyContext, handler, quantize
from greenopt.compress.q_bnb import problem
from greenopt.config import PROTOCOL_PRESETS, QuantizeStep, SpaceSpec, Variant
from greenopt.config.recipe import ModelSection, Recipe
from greenopt.errors import ConfigError, ModelError, MoveError
from greenopt.evaluate import validate_tasks
from greenopt.evaluate.user_tasks import load_tasks
from greenopt.label import load_scheme
from greenopt.models import DEFAULT_MODEL_ID, resolve
from greenopt.records import Issue
from greenopt.runtimes import unrealisable
from greenopt.search import space as sp

# search dimension name (greenopt.search.space) -> the SpaceSpec field it comes from; first prefix wins
_SPACE_PATHS = {"bits.lm_head": "lm_head_bits", "bits.embedding": "embedding_bits", "prune.sparsity": "sparsity", "bits": "bits", "quant": "methods",
                "prune": "prune", "depth": "depth_drop_max", "width.ffn_keep": "ffn_keep_min",
                "width.heads_keep": "heads_keep", "experts": "expert_keep_min", "moefy.experts": "moefy_experts",
                "moefy.top_k": "moefy_top_k"}


class _Calibrated:
    """Stands in for a tokenizer in architecture checks: calibrated moves only test for one."""


def cross_field_issues(r: Recipe) -> tuple[list[Issue], list[str]]:
    """Rules spanning fields: schemes and targets, tier vs meter, tasks, bits and group sizes per
    method, and (when the model's config is readable) the variant or search space against it.

    Returns:
        (issues, notes); notes say which checks could not run and why.
    """
    issues: list[Issue] = []
    scheme_notes = _scheme_and_target_issues(r, issues)
    if r.measurement.meter == "estimate" and r.gate.require_tier in ("M1", "M2"):
        issues.append(Issue(path="gate.require_tier", message=(
            f"measurement.meter 'estimate' gives tier E1 but the gate requires {r.gate.require_tier}; "
            "use meter auto, nvml or rapl, or require E1")))
    _task_issues(r, issues)
    deploy_notes: list[str] = []
    if r.variant is not None:
        for i, step in enumerate(r.variant.steps):
            if isinstance(step, QuantizeStep):
                issues += _quant_issues(f"variant.steps.{i}", step)
        issues += _deploy_issues(r.variant, deploy_notes)
    if r.search is not None:
        issues += _space_issues(r.search.space)
        deploy_notes += sp.not_sampled(r.search.space)
    cfg, notes, model_issues = model_config(r.model)
    notes = scheme_notes + deploy_notes + notes
    issues += model_issues
    if not issues and cfg is not None:
        if r.search is not None:
            space, left_out = sp.space_for_model(r.search.space, cfg)
            notes += [f"search.space.{field}: left out: {why}" for field, why in left_out.items()]
            r = r.model_copy(update={"search": r.search.model_copy(update={"space": space})})
        issues += _architecture_issues(r, cfg)
    return issues, notes


def _deploy_issues(variant: Variant, notes: list[str]) -> list[Issue]:
    """A step the variant's runtime cannot realise is an issue; what this machine lacks is a note
    (the recipe may be meant for another machine)."""
    reason = unrealisable(variant.deploy, variant.steps, "cuda")  # the steps alone, whatever the device
    if reason:
        return [Issue(path="variant.deploy", message=reason)]
    here = unrealisable(variant.deploy, variant.steps, "cpu")
    if here:
        notes.append(f"variant.deploy: on this machine's CPU: {here}")
    return []


def _scheme_and_target_issues(r: Recipe, issues: list[Issue]) -> list[str]:
    protocol_id = r.resolved_protocol().id
    schemes, notes = {}, []
    targets_absolute = r.search is not None and r.search.target_scheme == "absolute"
    for key, metric in (("relative", "eei"), ("absolute", "joules_per_token")):
        name = getattr(r.labels, key)
        if name is None:
            continue
        try:
            s = load_scheme(name)
        except ConfigError as e:
            issues.append(Issue(path=f"labels.{key}", message=str(e)))
            continue
        if s.metric != metric:
            issues.append(Issue(path=f"labels.{key}", message=f"scheme {s.name} grades {s.metric}; "
                                f"the {key} scheme must grade {metric}"))
        elif not s.accepts_protocol(protocol_id) and (key == "relative" or targets_absolute):
            issues.append(Issue(path=f"labels.{key}", message=f"scheme {s.name} assumes protocol {s.protocol}, "
                                f"but the recipe measures under {protocol_id}"))
        elif not s.accepts_protocol(protocol_id):
            notes.append(f"labels.absolute: {s.name} issues no class under {protocol_id} (its bands hold for "
                         f"{s.protocol} p256-n256 only); the card prints J/token without an absolute class")
        else:
            schemes[key] = s
    checks = [("gate.target", r.gate.target, "relative")]
    if r.search is not None:
        checks.append(("search.target", r.search.target, r.search.target_scheme))
        if r.search.target_scheme == "absolute" and r.labels.absolute is None:
            issues.append(Issue(path="search.target_scheme", message="targets the absolute class, "
                                "but labels.absolute is null; name an absolute scheme"))
        if r.protocol_preset_name() is None:
            issues.append(Issue(path="protocol", message="a search needs a protocol preset name "
                                f"({', '.join(PROTOCOL_PRESETS)}), not custom fields"))
    for path, letter, key in checks:
        s = schemes.get(key)
        if letter is not None and s is not None and letter not in s.letters:
            issues.append(Issue(path=path, message=f"class {letter!r} is not in scheme {s.name} "
                                f"(classes {', '.join(s.letters)})"))
    return notes


def _task_issues(r: Recipe, issues: list[Issue]) -> None:
    tasks = r.evaluation.tasks
    if not tasks:
        if r.search is not None:
            issues.append(Issue(path="evaluation.tasks", message="a search needs at least one accuracy task"))
        if r.gate.max_drop is not None or (r.search is not None and r.search.max_drop is not None):
            path = "gate.max_drop" if r.gate.max_drop is not None else "search.max_drop"
            issues.append(Issue(path=path, message="an accuracy budget needs evaluation.tasks"))
        return
    include = r.evaluation.include_path
    if include:
        try:
            load_tasks(include)  # every task file, each problem naming its file and field
        except ConfigError as e:
            issues.append(Issue(path="evaluation.include_path", message=str(e)))
            return
    try:
        validate_tasks(tasks, include)  # unknown names, and tasks whose data would need the network
    except ConfigError as e:
        issues.append(Issue(path="evaluation.tasks", message=str(e)))


def _method_bits() -> dict[str, tuple[int, ...]]:
    return quantize.BITS  # the quantize step's own table of bits per method


def _group_problem(method: str, bits: int, group_size: int | None) -> tuple[str, str] | None:
    """(field, message) when ``method`` cannot take ``bits`` or ``group_size``, else None."""
    bits_ok = _method_bits().get(method, ())
    if bits != 16 and bits not in bits_ok:
        return "bits", f"method {method} supports {'/'.join(map(str, bits_ok))} bits, not {bits}"
    if method.startswith("bnb_") and bits != 16:

        msg = problem(method, None, bits, group_size)
        return ("group_size", msg) if msg else None
    return None


def _quant_issues(path: str, step: QuantizeStep) -> list[Issue]:
    out = []
    found = _group_problem(step.method, step.bits, step.group_size)
    if found:
        out.append(Issue(path=f"{path}.{found[0]}", message=found[1]))
    for k, ov in enumerate(step.overrides):
        found = _group_problem(ov.method or step.method, ov.bits or step.bits,
                               ov.group_size if ov.group_size is not None else step.group_size)
        if found:
            out.append(Issue(path=f"{path}.overrides.{k}", message=found[1]))
    return out


def _space_issues(space: SpaceSpec) -> list[Issue]:
    out = []
    for field, widths in (("bits", space.bits), ("lm_head_bits", space.lm_head_bits)):
        for method in space.methods:
            for b in sorted({w for w in widths if w != 16}, reverse=True):
                found = _group_problem(method, b, space.group_size)
                if found:
                    where = field if found[0] == "bits" else "group_size"
                    out.append(Issue(path=f"search.space.{where}", message=found[1]))
    if any(e < 2 for e in space.moefy_experts):
        out.append(Issue(path="search.space.moefy_experts", message="an MoE split needs at least 2 experts"))
    return list({i.line(): i for i in out}.values())


def model_config(ms: ModelSection) -> tuple[Any, list[str], list[Issue]]:
    """The model's transformers config without loading weights: (config or None, notes, issues)."""
    from transformers import AutoConfig


    if ms.id == "default":
        path = offline.home() / "models" / DEFAULT_MODEL_ID
        if not (path / "config.json").is_file():
            return None, ["default model not prepared (run greenopt fetch): architecture checks skipped"], []
        where, local = str(path), True
    else:
        try:
            source, where = resolve(ms.id)
        except ModelError as e:
            return None, [], [Issue(path="model.id", message=str(e))]
        local = source != "hub"
    try:
        cfg = AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=ms.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            return None, [], [Issue(path="model.id", message=f"cannot read the model config: {first}")]
        return None, [f"config of {ms.id} is not in the local cache: architecture checks skipped"], []
    return cfg, [], []


def _meta_model(r: Recipe, cfg: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=r.model.trust_remote_code)


def _architecture_issues(r: Recipe, cfg: Any) -> list[Issue]:
    try:
        model = _meta_model(r, cfg)
    except Exception as e:  # noqa: BLE001 - any failure to build the architecture is the finding
        return [Issue(path="model.id", message=f"cannot build the architecture from its config: {e}")]
    ctx = ApplyContext(tokenizer=_Calibrated(), calib=r.calibration)
    cases = ([(f"variant.steps.{i}", "", Variant(steps=(s,))) for i, s in enumerate(r.variant.steps)]
             if r.variant is not None else _axis_variants(r.search.space, len_layers(cfg)))  # type: ignore[union-attr]
    out: list[Issue] = []
    for path, what, variant in cases:
        if isinstance(variant, Issue):
            out.append(variant)
            continue
        try:
            for step in variant.steps:
                handler(step.kind).check(model, step, ctx)
        except MoveError as e:
            if path.startswith("search.space.") and "group_size" in str(e):
                path = "search.space.group_size"  # the width cannot take the space's group size
            out.append(Issue(path=path, message=f"{what}{e}"))
    return list({i.line(): i for i in out}.values())


def len_layers(cfg: Any) -> int:
    """Decoder layers in a config (``num_hidden_layers``; text config for multimodal ones)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(text, "num_hidden_layers", 0) or 4)


def _space_path(dim: str) -> str:
    key = next((k for k in _SPACE_PATHS if dim == k or dim.startswith(k + ".")), dim)
    return f"search.space.{_SPACE_PATHS.get(key, key)}"


def _axis_variants(space: SpaceSpec, n_layers: int) -> list[tuple[str, str, Any]]:
    """(field path, label, Variant or Issue) for each non-identity value of each search dimension
    alone, and for each quantization method at each bit width."""

    dims = sp.dims(space, n_layers)
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for d in dims:
        values = d.choices if d.kind == "cat" else (d.low, d.high)
        label = "bits" if d.name.startswith("bits.g") else d.name
        cases += [(_space_path(d.name), f"{label}={v}", {d.name: v}) for v in values if v != d.identity]
    bit_dims = [d.name for d in dims if d.name.startswith("bits.g")]
    for method in space.methods:
        for b in sorted({w for w in space.bits if w != 16}, reverse=True):
            cases.append(("search.space.methods", f"method {method} at bits={b}",
                          {**{n: b for n in bit_dims}, "quant.method": method}))
    out: list[tuple[str, str, Any]] = []
    for path, label, params in cases:
        try:
            out.append((path, f"{label}: ", sp.build(params, space, n_layers)))
        except (ValueError, ValidationError) as e:
            out.append(("", "", Issue(path=path, message=f"{label}: {str(e).splitlines()[0]}")))
    return out


# ---------------------------------------------------------------------------- dry run
