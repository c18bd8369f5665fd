"""The label card (shared/ENERGY.md §6): one record, rendered as JSON, Markdown and SVG.

Every export carries the card. It states the model and variant, the relative class with EEI
and interval, the absolute J/token (and absolute class when allowed), tier and measurement
boundary, device, runtime, trials and CV, accuracy beside the baseline, carbon with the grid
intensity used, protocol and scheme versions, the date and the greenopt version.

Example:
    >>> card = build_card(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", variant_name="int4",
    ...                   variant_hash=variant.hash, comparison=cmp, candidate_eval=ev,
    ...                   baseline_eval=base_ev, runtime=current_runtime(protocol, "sdpa", "bf16"))
    >>> paths = write_card(card, "out/")        # label.json, LABEL.md, label.svg
    >>> load_card(paths["json"]) == card
    True
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from greenopt._io import version, write_texts
from greenopt._version import __version__
from greenopt.config import Protocol, load_json, validated
from greenopt.errors import ConfigError
from greenopt.label import (
    DEFAULT_GRID_G_PER_KWH,
    LabelScheme,
    carbon_g_per_1k_tokens,
    grade_comparison,
    grade_measurement,
    load_scheme,
    text,
)
from greenopt.label.card_svg import render_svg
from greenopt.records import (
    ApplyReport,
    CarbonLine,
    Comparison,
    EnergyMeasurement,
    EnergySummary,
    EvalResult,
    Grade,
    LabelCard,
    RuntimeInfo,
    TaskLine,
    VariantInfo,
)

CARD_FILES = {"json": "label.json", "markdown": "LABEL.md", "svg": "label.svg"}
TIER_MEANING = {"M1": "hardware energy counter", "M2": "sampled power, integrated",
                "E1": "model-based estimate"}


# ---------------------------------------------------------------------------- building


def current_runtime(protocol: Protocol, attention: str, dtype: str,
                    libraries: tuple[str, ...] = ()) -> RuntimeInfo:
    """The installed torch/transformers versions plus the workload of ``protocol``.

    Args:
        protocol: the energy protocol the figures were measured under.
        attention: attention implementation, e.g. ``"sdpa"`` or ``"eager"``.
        dtype: compute dtype, e.g. ``"bfloat16"``.
        libraries: extra distributions whose versions to record (e.g. ``("hqq",)``).

    Returns:
        The runtime record for :func:`build_card`.
    """
    return RuntimeInfo(torch=version("torch"), transformers=version("transformers"),
                       attention=attention, dtype=dtype, batch_size=protocol.batch_size,
                       prompt_tokens=protocol.prompt_tokens, new_tokens=protocol.new_tokens,
                       libraries={d: version(d) for d in libraries})


def build_card(*, model_id: str, variant_name: str, variant_hash: str, comparison: Comparison,
               candidate_eval: EvalResult, baseline_eval: EvalResult,
               runtime: RuntimeInfo | dict[str, Any],
               relative_scheme: LabelScheme | str = "relative-eu",
               absolute_scheme: LabelScheme | str | None = None,
               intensity_g_per_kwh: float = DEFAULT_GRID_G_PER_KWH,
               apply_report: ApplyReport | None = None, date: str | None = None) -> LabelCard:
    """Assembles the label card of a measured and evaluated variant.

    Args:
        model_id: hub id or path of the base model.
        variant_name: the variant's display name.
        variant_hash: ``Variant.hash`` of the variant's steps.
        comparison: baseline and candidate measured in the same GO-1 run.
        candidate_eval: the variant's accuracy.
        baseline_eval: the baseline's accuracy on the same tasks and items.
        runtime: a :class:`RuntimeInfo` or a dict with its fields.
        relative_scheme: scheme (or shipped name) for the relative class; metric ``eei``.
        absolute_scheme: scheme (or name) for the absolute class; ``None`` skips it (opt-in).
        intensity_g_per_kwh: grid intensity for the carbon line, in gCO2e/kWh.
        apply_report: what the variant changed (step summaries, params, bytes), if known.
        date: ISO timestamp; defaults to now (UTC).

    Returns:
        The frozen card.

    Raises:
        ConfigError: a scheme or the runtime is invalid or does not fit the figures.
        ValueError: the evaluations or the apply report do not belong together.
    """
    cand = comparison.candidate
    rel_scheme = load_scheme(relative_scheme)
    abs_scheme = None if absolute_scheme is None else load_scheme(absolute_scheme)
    rel = grade_comparison(comparison, rel_scheme)
    absolute, note = _absolute(cand, abs_scheme)
    if apply_report is not None and apply_report.variant_hash != variant_hash:
        raise ValueError(f"apply report is for variant {apply_report.variant_hash}, not {variant_hash}")
    if not isinstance(runtime, RuntimeInfo):
        runtime = validated(RuntimeInfo, runtime, where="runtime")  # type: ignore[arg-type]
    return LabelCard(
        model_id=model_id, variant=_variant_info(variant_name, variant_hash, apply_report),
        relative=rel, relative_scheme=rel_scheme, absolute=absolute, absolute_scheme=abs_scheme,
        absolute_note=note,
        candidate=_summary(cand), baseline=_summary(comparison.baseline), tier=comparison.tier,
        device=cand.device, runtime=runtime, protocol_id=cand.protocol_id,
        interval_note=comparison.interval_note, eei_runs=comparison.runs,
        accuracy=_task_lines(candidate_eval, baseline_eval), eval_limit=candidate_eval.limit,
        eval_seed=candidate_eval.seed,
        carbon=CarbonLine(g_per_1k_tokens=carbon_g_per_1k_tokens(cand.joules_per_token, intensity_g_per_kwh),
                          intensity_g_per_kwh=intensity_g_per_kwh, estimated=cand.tier == "E1"),
        date=date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        greenopt_version=__version__,
    )


def _absolute(cand: EnergyMeasurement, scheme: LabelScheme | None) -> tuple[Grade | None, str | None]:
    if scheme is None:
        return None, "no absolute scheme selected (absolute classes are opt-in)"
    if not scheme.accepts_protocol(cand.protocol_id):
        return None, f"scheme {scheme.name} assumes protocol {scheme.protocol}; measured under {cand.protocol_id}"
    # ENERGY.md §4: an absolute letter only from M1/M2 figures under the anchored workload on one
    # accelerator; otherwise no class at all (the J/token figure is still printed).
    if cand.tier == "E1":
        return None, "no absolute class: absolute classes are issued only from M1/M2 figures, this one is an E1 estimate"
    if cand.device.kind != "cuda":
        return None, "no absolute class: absolute classes are issued only for figures measured on one accelerator"
    return grade_measurement(cand, scheme), None


def _tier_text(card: LabelCard) -> str:
    """What the figures are: their source, and the checks that dropped their tier (never renamed)."""
    c = card.candidate
    if c.source_tier == card.tier:
        return TIER_MEANING[card.tier]
    return (f"{TIER_MEANING[c.source_tier]}, flagged ({', '.join(c.flags) or 'failed check'}): "
            f"counted one tier down as {card.tier}")


def _variant_info(name: str, hash_: str, rep: ApplyReport | None) -> VariantInfo:
    if rep is None:
        return VariantInfo(name=name, hash=hash_)
    return VariantInfo(name=name, hash=hash_, steps=tuple(s.summary for s in rep.steps),
                       params_before=rep.params_before, params_after=rep.params_after,
                       weight_bytes_before=rep.weight_bytes_before,
                       weight_bytes_after=rep.weight_bytes_after)


def _summary(m: EnergyMeasurement) -> EnergySummary:
    return EnergySummary(
        joules_per_token=m.joules_per_token, joules_per_token_ci=m.joules_per_token_ci,
        decode_joules_per_token=m.decode_joules_per_token,
        prefill_joules_per_prompt_token=m.prefill_joules_per_prompt_token,
        tokens_per_s=m.tokens_per_s, mean_power_w=m.mean_power_w, idle_power_w=m.idle_power_w,
        tier=m.tier, source_tier=m.source_tier, trials=len(m.trials), cv=m.cv, flags=m.flags,
    )


def _task_lines(cand: EvalResult, base: EvalResult) -> tuple[TaskLine, ...]:
    lines = []
    for s in cand.scores:
        try:
            b = base.score(s.task)
        except KeyError:
            raise ValueError(f"baseline evaluation has no task {s.task!r}; evaluate both on the same tasks") from None
        if b.metric != s.metric:
            raise ValueError(f"task {s.task}: metric {s.metric} vs baseline {b.metric}")
        drop = b.value - s.value if s.higher_is_better else s.value - b.value
        lines.append(TaskLine(task=s.task, metric=s.metric, value=s.value, baseline=b.value,
                              drop=drop, higher_is_better=s.higher_is_better, n=s.n, stderr=s.stderr))
    return tuple(lines)


# ---------------------------------------------------------------------------- files


def render_json(card: LabelCard) -> str:
    """The card as indented JSON (the machine-readable label)."""
    return card.model_dump_json(indent=2) + "\n"


def load_card(path: str | Path) -> LabelCard:
    """Reads a card from ``label.json`` (or a folder holding one).

    Raises:
        ConfigError: missing file, invalid JSON, or a field that does not validate.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CARD_FILES["json"]
    if not p.is_file():
        raise ConfigError(f"{p}: no label card there; write one with write_card or `greenopt export`")
    return load_json(p, LabelCard)


def write_card(card: LabelCard, out_dir: str | Path) -> dict[str, Path]:
    """Writes ``label.json``, ``LABEL.md`` and ``label.svg`` into ``out_dir`` as one set: a
    failure (disk full, read-only) leaves the old three files, never a mix of old and new.

    Args:
        card: the card.
        out_dir: target folder, created if missing.

    Returns:
        ``{"json": path, "markdown": path, "svg": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {"json": render_json(card), "markdown": render_markdown(card), "svg": render_svg(card)}
    paths = {kind: out / CARD_FILES[kind] for kind in texts}
    write_texts({paths[kind]: body for kind, body in texts.items()})
    return paths


def _md(text: object) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|")


# ---------------------------------------------------------------------------- markdown


def render_markdown(card: LabelCard) -> str:
    """The card as Markdown (LABEL.md): every field of ENERGY.md §6, user text escaped."""
    c, b, r, d, rel = card.candidate, card.baseline, card.runtime, card.device, card.relative
    out = [f"# Energy label: {_md(card.model_id)} · {_md(card.variant.name)}", ""]
    if card.estimated:
        out += ["> **ESTIMATE — not a measured label.** The energy figures are a model-based "
                "estimate (tier E1), not an energy counter reading.", ""]
    runs = f"; EEI of each comparison {', '.join(text.num(x) for x in card.eei_runs)}" if card.eei_runs else ""
    out += [f"**Relative class: {rel.display}** — EEI {text.num(rel.value)} (95% CI {text.interval(rel.interval)}, "
            f"{_md(card.interval_note)}{runs}) vs the uncompressed baseline; scheme {text.scheme_name(rel)}.", ""]
    abs_txt = f"**Absolute: {text.num(c.joules_per_token)} J/token** (95% CI {text.interval(c.joules_per_token_ci)}, tier {c.tier})"
    if card.absolute is not None:
        abs_txt += f" — class {card.absolute.display}, scheme {text.scheme_name(card.absolute)}"
    if card.absolute_note:
        abs_txt += f" — {_md(card.absolute_note)}"
    out += [abs_txt + ".", "", f"## Energy (protocol {_md(card.protocol_id)})", "",
            "| figure | variant | baseline |", "|---|---|---|"]
    rows = [
        ("J/token (95% CI)", lambda m: f"{text.num(m.joules_per_token)} ({text.interval(m.joules_per_token_ci)})"),
        ("decode J/token", lambda m: text.num(m.decode_joules_per_token)),
        ("prefill J per prompt token", lambda m: text.num(m.prefill_joules_per_prompt_token)),
        ("tokens/s", lambda m: text.num(m.tokens_per_s)),
        ("mean power W", lambda m: text.num(m.mean_power_w)),
        ("idle power W (recorded, not subtracted)", lambda m: text.num(m.idle_power_w)),
        ("tier", lambda m: m.tier if m.tier == m.source_tier else f"{m.tier} (downgraded from {m.source_tier})"),
        ("trials", lambda m: str(m.trials)),
        ("CV", lambda m: f"{m.cv * 100:.1f}%"),
        ("validity", lambda m: "all checks passed" if not m.flags else "failed: " + ", ".join(m.flags)),
    ]
    out += [f"| {name} | {_md(f(c))} | {_md(f(b))} |" for name, f in rows]
    out += ["", "## Measurement", "",
            f"- Tier: {card.tier} ({_tier_text(card)}); a ratio takes the worse tier of its two sides",
            f"- Boundary: {_md(d.boundary)}; meter: {_md(d.meter)}",
            f"- Device: {_md(d.name)} ({d.kind})",
            f"- Driver: {_md(d.driver or 'n/a')}",
            f"- Power limit: {text.num(d.power_limit_w, 'W')}"]
    out += [f"- Note: {_md(x)}" for x in d.notes]
    libs = "".join(f", {_md(k)} {_md(v)}" for k, v in r.libraries.items())
    out += ["", "## Runtime", "",
            f"- Libraries: torch {_md(r.torch)}, transformers {_md(r.transformers)}{libs}",
            f"- Attention: {_md(r.attention)}; dtype: {_md(r.dtype)}",
            f"- Batch size: {r.batch_size}; prompt tokens: {r.prompt_tokens}; new tokens: {r.new_tokens}"]
    if r.deployed is not None:
        out.append(f"- Variant deployed on: {_md(r.deployed.line())}")
    if r.baseline is not None:
        out.append(f"- Baseline on (the reference): {_md(r.baseline.line())}")
    out += ["", "## Accuracy", "",
            f"Items per task: {card.eval_limit or 'full set'}; seed {card.eval_seed}. "
            "Drop = baseline minus variant (positive: the variant is worse).", "",
            "| task | metric | variant | baseline | drop | n |", "|---|---|---|---|---|---|"]
    out += [f"| {_md(t.task)} | {_md(t.metric)} | {text.score(t, t.value)} | {text.score(t, t.baseline)} "
            f"| {text.drop(t)} | {t.n} |" for t in card.accuracy]
    est = " (from an estimated J/token)" if card.carbon.estimated else ""
    out += ["", "## Carbon", "",
            f"{card.carbon.g_per_1k_tokens:.3g} gCO2e per 1000 generated tokens at "
            f"{text.num(card.carbon.intensity_g_per_kwh)} g/kWh grid intensity{est}; printed beside the "
            "class, never part of it.", "", "## Variant", "",
            f"- Name: {_md(card.variant.name)}; hash: `{_md(card.variant.hash)}`"]
    out += [f"- Step: {_md(s)}" for s in card.variant.steps] or ["- Steps: none recorded"]
    v = card.variant
    if v.params_before is not None:
        out.append(f"- Parameters: {v.params_before:,} -> {v.params_after:,}; weight bytes: "
                   f"{v.weight_bytes_before:,} -> {v.weight_bytes_after:,}")
    schemes = text.scheme_name(rel) + (f", {text.scheme_name(card.absolute)}" if card.absolute else "")
    out += ["", "---", "", f"Protocol {_md(card.protocol_id)} · schemes {schemes} · card v{card.card_version} · "
            f"{_md(card.date)} · greenopt {_md(card.greenopt_version)}", ""]
    return "\n".join(out)


