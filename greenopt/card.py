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
import json
import os
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import greenopt
from greenopt.config import Protocol, validated
from greenopt.errors import ConfigError
from greenopt.label import (DEFAULT_GRID_G_PER_KWH, Grade, LabelScheme, carbon_g_per_1k_tokens,
                            grade_comparison, grade_measurement, load_scheme)
from greenopt.records import (ApplyReport, Comparison, DeviceInfo, EnergyMeasurement, EvalResult,
                              Record, Tier)

CARD_FILES = {"json": "label.json", "markdown": "LABEL.md", "svg": "label.svg"}
TIER_MEANING = {"M1": "hardware energy counter", "M2": "sampled power, integrated",
                "E1": "model-based estimate"}


class VariantInfo(Record):
    """The variant on the label: name, step hash and what its steps changed."""

    name: str
    hash: str
    steps: tuple[str, ...] = ()
    params_before: int | None = None
    params_after: int | None = None
    weight_bytes_before: int | None = None
    weight_bytes_after: int | None = None


class EnergySummary(Record):
    """GO-1 figures of one model, as printed on the card (J, W, s)."""

    joules_per_token: float
    joules_per_token_ci: tuple[float, float]
    decode_joules_per_token: float | None
    prefill_joules_per_prompt_token: float | None
    tokens_per_s: float
    mean_power_w: float
    idle_power_w: float | None
    tier: Tier
    source_tier: Tier
    trials: int
    cv: float
    flags: tuple[str, ...] = ()


class RuntimeInfo(Record):
    """The runtime the figures hold for: library versions, attention, dtype and workload."""

    torch: str
    transformers: str
    attention: str
    dtype: str
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    libraries: dict[str, str] = {}


class TaskLine(Record):
    """Accuracy on one task beside the baseline; ``drop`` > 0 means the variant is worse."""

    task: str
    metric: str
    value: float
    baseline: float
    drop: float
    higher_is_better: bool
    n: int
    stderr: float | None = None


class CarbonLine(Record):
    """gCO2e per 1000 generated tokens of the variant at the stated grid intensity."""

    g_per_1k_tokens: float
    intensity_g_per_kwh: float
    estimated: bool


class LabelCard(Record):
    """Everything a label states; JSON round-trips through :func:`load_card`."""

    card_version: Literal[1] = 1
    model_id: str
    variant: VariantInfo
    relative: Grade
    relative_scheme: LabelScheme
    absolute: Grade | None
    absolute_scheme: LabelScheme | None
    absolute_note: str | None
    candidate: EnergySummary
    baseline: EnergySummary
    tier: Tier
    device: DeviceInfo
    runtime: RuntimeInfo
    protocol_id: str
    accuracy: tuple[TaskLine, ...]
    eval_limit: int | None
    eval_seed: int
    carbon: CarbonLine
    date: str
    greenopt_version: str

    @property
    def estimated(self) -> bool:
        """True when the label's letter comes from an E1 estimate (never a plain letter)."""
        return self.relative.estimated

    @property
    def flags(self) -> tuple[str, ...]:
        """Failed validity checks of either measurement (empty: all checks passed)."""
        return tuple(dict.fromkeys(self.candidate.flags + self.baseline.flags))


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
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

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
        accuracy=_task_lines(candidate_eval, baseline_eval), eval_limit=candidate_eval.limit,
        eval_seed=candidate_eval.seed,
        carbon=CarbonLine(g_per_1k_tokens=carbon_g_per_1k_tokens(cand.joules_per_token, intensity_g_per_kwh),
                          intensity_g_per_kwh=intensity_g_per_kwh, estimated=cand.tier == "E1"),
        date=date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        greenopt_version=greenopt.__version__,
    )


def _absolute(cand: EnergyMeasurement, scheme: LabelScheme | None) -> tuple[Grade | None, str | None]:
    if scheme is None:
        return None, "no absolute scheme selected (absolute classes are opt-in)"
    if not scheme.accepts_protocol(cand.protocol_id):
        return None, f"scheme {scheme.name} assumes protocol {scheme.protocol}; measured under {cand.protocol_id}"
    g = grade_measurement(cand, scheme)
    if cand.device.kind != "cuda" and not g.estimated:
        # ENERGY.md §4: absolute letters only from M1/M2 figures on one accelerator.
        g = g.model_copy(update={"estimated": True, "display": "~" + g.display.split(" (")[0]
                                 + " (not on an accelerator)"})
        return g, "absolute classes are issued only for figures measured on one accelerator"
    if g.estimated:
        return g, "absolute classes are issued only from M1/M2 figures; this one is an E1 estimate"
    return g, None


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
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON at line {e.lineno}") from None
    return validated(LabelCard, data, where=str(p))  # type: ignore[arg-type]


def write_card(card: LabelCard, out_dir: str | Path) -> dict[str, Path]:
    """Writes ``label.json``, ``LABEL.md`` and ``label.svg`` atomically into ``out_dir``.

    Args:
        card: the card.
        out_dir: target folder, created if missing.

    Returns:
        ``{"json": path, "markdown": path, "svg": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {"json": render_json(card), "markdown": render_markdown(card), "svg": render_svg(card)}
    paths = {}
    for kind, text in texts.items():
        paths[kind] = out / CARD_FILES[kind]
        _atomic_write(paths[kind], text)
    return paths


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a card is meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- text helpers


def _n(x: float | None, unit: str = "") -> str:
    """About three significant digits, no exponent for everyday magnitudes."""
    if x is None:
        return "n/a"
    a = abs(x)
    s = f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 1 else f"{x:.3g}"
    return f"{s} {unit}".rstrip()


def _ci(ci: tuple[float, float]) -> str:
    return f"{_n(ci[0])}–{_n(ci[1])}"


def _is_fraction(t: TaskLine) -> bool:
    return t.higher_is_better and 0.0 <= t.value <= 1.0 and 0.0 <= t.baseline <= 1.0


def _score(t: TaskLine, v: float) -> str:
    return f"{v * 100:.1f}%" if _is_fraction(t) else _n(v)


def _drop(t: TaskLine) -> str:
    return f"{t.drop * 100:.1f} pt" if _is_fraction(t) else f"{t.drop:.3g}"


def _delta(t: TaskLine) -> str:
    d = t.value - t.baseline
    s = f"{d * 100:+.1f} pt" if _is_fraction(t) else f"{d:+.3g}"
    return s.replace("-", "−")


def _scheme_name(g: Grade) -> str:
    return f"{g.scheme} v{g.scheme_version}"


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
    out += [f"**Relative class: {rel.display}** — EEI {_n(rel.value)} (95% CI {_ci(rel.interval)}) "
            f"vs the uncompressed baseline; scheme {_scheme_name(rel)}.", ""]
    abs_txt = f"**Absolute: {_n(c.joules_per_token)} J/token** (95% CI {_ci(c.joules_per_token_ci)}, tier {c.tier})"
    if card.absolute is not None:
        abs_txt += f" — class {card.absolute.display}, scheme {_scheme_name(card.absolute)}"
    if card.absolute_note:
        abs_txt += f" — {_md(card.absolute_note)}"
    out += [abs_txt + ".", "", f"## Energy (protocol {_md(card.protocol_id)})", "",
            "| figure | variant | baseline |", "|---|---|---|"]
    rows = [
        ("J/token (95% CI)", lambda m: f"{_n(m.joules_per_token)} ({_ci(m.joules_per_token_ci)})"),
        ("decode J/token", lambda m: _n(m.decode_joules_per_token)),
        ("prefill J per prompt token", lambda m: _n(m.prefill_joules_per_prompt_token)),
        ("tokens/s", lambda m: _n(m.tokens_per_s)),
        ("mean power W", lambda m: _n(m.mean_power_w)),
        ("idle power W (recorded, not subtracted)", lambda m: _n(m.idle_power_w)),
        ("tier", lambda m: m.tier if m.tier == m.source_tier else f"{m.tier} (downgraded from {m.source_tier})"),
        ("trials", lambda m: str(m.trials)),
        ("CV", lambda m: f"{m.cv * 100:.1f}%"),
        ("validity", lambda m: "all checks passed" if not m.flags else "failed: " + ", ".join(m.flags)),
    ]
    out += [f"| {name} | {_md(f(c))} | {_md(f(b))} |" for name, f in rows]
    out += ["", "## Measurement", "",
            f"- Tier: {card.tier} ({TIER_MEANING[card.tier]}); a ratio takes the worse tier of its two sides",
            f"- Boundary: {_md(d.boundary)}; meter: {_md(d.meter)}",
            f"- Device: {_md(d.name)} ({d.kind})",
            f"- Driver: {_md(d.driver or 'n/a')}",
            f"- Power limit: {_n(d.power_limit_w, 'W')}"]
    out += [f"- Note: {_md(x)}" for x in d.notes]
    libs = "".join(f", {_md(k)} {_md(v)}" for k, v in r.libraries.items())
    out += ["", "## Runtime", "",
            f"- Libraries: torch {_md(r.torch)}, transformers {_md(r.transformers)}{libs}",
            f"- Attention: {_md(r.attention)}; dtype: {_md(r.dtype)}",
            f"- Batch size: {r.batch_size}; prompt tokens: {r.prompt_tokens}; new tokens: {r.new_tokens}",
            "", "## Accuracy", "",
            f"Items per task: {card.eval_limit or 'full set'}; seed {card.eval_seed}. "
            "Drop = baseline minus variant (positive: the variant is worse).", "",
            "| task | metric | variant | baseline | drop | n |", "|---|---|---|---|---|---|"]
    out += [f"| {_md(t.task)} | {_md(t.metric)} | {_score(t, t.value)} | {_score(t, t.baseline)} "
            f"| {_drop(t)} | {t.n} |" for t in card.accuracy]
    est = " (from an estimated J/token)" if card.carbon.estimated else ""
    out += ["", "## Carbon", "",
            f"{card.carbon.g_per_1k_tokens:.3g} gCO2e per 1000 generated tokens at "
            f"{_n(card.carbon.intensity_g_per_kwh)} g/kWh grid intensity{est}; printed beside the "
            "class, never part of it.", "", "## Variant", "",
            f"- Name: {_md(card.variant.name)}; hash: `{_md(card.variant.hash)}`"]
    out += [f"- Step: {_md(s)}" for s in card.variant.steps] or ["- Steps: none recorded"]
    v = card.variant
    if v.params_before is not None:
        out.append(f"- Parameters: {v.params_before:,} -> {v.params_after:,}; weight bytes: "
                   f"{v.weight_bytes_before:,} -> {v.weight_bytes_after:,}")
    schemes = _scheme_name(rel) + (f", {_scheme_name(card.absolute)}" if card.absolute else "")
    out += ["", "---", "", f"Protocol {_md(card.protocol_id)} · schemes {schemes} · card v{card.card_version} · "
            f"{_md(card.date)} · greenopt {_md(card.greenopt_version)}", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- svg

# EU energy label palette (CMYK of the regulation's template, in sRGB): dark green A -> red G.
_PALETTE = ("#00a651", "#4db848", "#b3d335", "#fff200", "#fdb913", "#f37021", "#ed1c24")
_INK = ("#fff", "#fff", "#1a1a1a", "#1a1a1a", "#1a1a1a", "#fff", "#fff")
_TIER_SHORT = {"M1": "energy counter", "M2": "sampled power", "E1": "estimate"}
_FONT = "Helvetica, Arial, 'Liberation Sans', 'DejaVu Sans', sans-serif"
_W, _H = 300, 550


def _x(text: object, max_chars: int | None = None) -> str:
    """XML-escapes text (dropping characters XML cannot hold), truncated with an ellipsis."""
    s = "".join(ch for ch in str(text) if ch in "\t\n" or ord(ch) >= 0x20 and ch not in "\ufffe\uffff")
    if max_chars is not None and len(s) > max_chars:
        s = s[: max_chars - 1].rstrip() + "…"
    return html.escape(s, quote=True)


def _t(x: float, y: float, text: str, size: float, *, weight: str = "normal", fill: str = "#1a1a1a",
       anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:g}" y="{y:g}" font-size="{size:g}" font-weight="{weight}" fill="{fill}" '
            f'text-anchor="{anchor}"{extra}>{text}</text>')


def _bars(scheme: LabelScheme, y0: float) -> tuple[list[str], list[float]]:
    n, parts, rows = len(scheme.classes), [], []
    bh, gap, x0, w_min, w_max = 20.0, 3.0, 14.0, 78.0, 192.0
    for i, cls in enumerate(scheme.classes):
        k = round(i * (len(_PALETTE) - 1) / max(n - 1, 1))
        y, w = y0 + i * (bh + gap), w_min + (w_max - w_min) * i / max(n - 1, 1)
        tip = x0 + w
        parts.append(f'<polygon points="{x0:g},{y:g} {tip - 11:g},{y:g} {tip:g},{y + bh / 2:g} '
                     f'{tip - 11:g},{y + bh:g} {x0:g},{y + bh:g}" fill="{_PALETTE[k]}"/>')
        parts.append(_t(x0 + 7, y + bh / 2 + 6, _x(cls.letter), 17, weight="bold", fill="#fff",
                        extra=' stroke="#1a1a1a" stroke-width="0.9" paint-order="stroke"'))
        prev = scheme.classes[i - 1].max if i else None
        bound = f"≤ {cls.max:g}" if cls.max is not None else f"> {prev:g}"
        parts.append(_t(tip - 14, y + bh / 2 + 3, _x(bound), 8, fill=_INK[k], anchor="end"))
        rows.append(y + bh / 2)
    return parts, rows


def _marker(g: Grade, scheme: LabelScheme, rows: list[float], estimated: bool) -> list[str]:
    idx = scheme.letters.index
    cy = rows[idx(g.letter)]
    sub = []
    if len(g.letter_range) > 1:
        sub.append(f"{g.letter_range[0]}–{g.letter_range[-1]}")
    sub += ["est."] if estimated else ["M2"] if g.tier == "M2" else []
    h = 40.0 if sub else 32.0
    x_tip, x_body, x_end = 224.0, 238.0, 288.0
    fill = "#4a4a4a" if estimated else "#111"
    parts = [f'<polygon points="{x_tip:g},{cy:g} {x_body:g},{cy - h / 2:g} {x_end:g},{cy - h / 2:g} '
             f'{x_end:g},{cy + h / 2:g} {x_body:g},{cy + h / 2:g}" fill="{fill}"/>']
    mid = (x_body + x_end) / 2
    head = f"~{g.letter}" if estimated else g.letter
    parts.append(_t(mid, cy + (2 if sub else 8), _x(head), 22, weight="bold", fill="#fff", anchor="middle"))
    if sub:
        parts.append(_t(mid, cy + 15, _x(", ".join(sub)), 8.5, weight="bold", fill="#fff", anchor="middle"))
    if len(g.letter_range) > 1:  # bracket over the classes the 95% interval spans
        y1, y2 = rows[idx(g.letter_range[0])] - 9, rows[idx(g.letter_range[-1])] + 9
        parts.append(f'<path d="M210,{y1:g} H215 V{y2:g} H210" fill="none" stroke="#1a1a1a" stroke-width="1.4"/>')
    return parts


def _info_rows(card: LabelCard) -> list[tuple[str, str]]:
    c, b, d, r, rel = card.candidate, card.baseline, card.device, card.runtime, card.relative
    if card.absolute is not None:
        absolute = f"class {card.absolute.display} · {_scheme_name(card.absolute)}"
    else:
        absolute = f"not graded: {card.absolute_note}"
    rows = [("Absolute", absolute),
            ("EEI", f"{_n(rel.value)} (95% CI {_ci(rel.interval)}) vs baseline {_n(b.joules_per_token)} J/tok"),
            ("Speed", f"{_n(c.tokens_per_s)} tok/s · {_n(c.mean_power_w)} W mean · "
                      + (f"{_n(c.idle_power_w)} W idle" if c.idle_power_w is not None else "idle n/a"))]
    acc = [f"{t.task} {_score(t, t.value)} (base {_score(t, t.baseline)}, {_delta(t)})" for t in card.accuracy]
    if len(acc) > 2:
        acc[1:] = [f"+{len(acc) - 1} more tasks: " + ", ".join(t.task for t in card.accuracy[1:])]
    rows += [("" if i else "Accuracy", line) for i, line in enumerate(acc or ["not evaluated"])]
    est = " (est.)" if card.carbon.estimated else ""
    rows += [("Carbon", f"{card.carbon.g_per_1k_tokens:.3g} g CO₂e / 1000 tok{est} @ "
                        f"{_n(card.carbon.intensity_g_per_kwh)} g/kWh"),
             ("Device", f"{d.name}" + (f" · {_n(d.power_limit_w)} W limit" if d.power_limit_w else "")),
             ("Boundary", d.boundary + (f" · driver {d.driver}" if d.driver else "")),
             ("Trials", f"{c.trials} + {b.trials} baseline · CV {c.cv * 100:.1f}% / {b.cv * 100:.1f}%"),
             ("Validity", "all checks passed" if not card.flags else "failed: " + ", ".join(card.flags)),
             ("Runtime", f"torch {r.torch} · transformers {r.transformers}"),
             ("", f"{r.attention} attention · {r.dtype} · batch {r.batch_size}"),
             ("Protocol", f"{card.protocol_id} · {r.prompt_tokens}+{r.new_tokens} tok · {_scheme_name(rel)}")]
    return rows


def render_svg(card: LabelCard) -> str:
    """The card as a self-contained SVG energy label (EU appliance style, 300x550 viewBox).

    Seven coloured A-G arrows, a black marker at the class (with the interval's range when
    it crosses a bound), then J/token with tier, EEI, speed, accuracy, carbon, device and
    protocol. An estimated card carries an "ESTIMATE" banner and a ``~X`` letter.
    """
    est, c, v = card.estimated, card.candidate, card.variant
    p = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" '
         f'font-family="{_FONT}">',
         f'<title>{_x(f"Energy label {card.model_id} {v.name}: {card.relative.display}")}</title>',
         f'<rect x="1" y="1" width="{_W - 2}" height="{_H - 2}" fill="#fff" stroke="#1a1a1a" stroke-width="2"/>',
         f'<rect x="1" y="1" width="{_W - 2}" height="27" fill="#003399"/>',
         _t(14, 20, "ENERGY", 14, weight="bold", fill="#fff", extra=' letter-spacing="2"'),
         _t(286, 19, "greenopt · language model label", 8.5, fill="#fff", anchor="end"),
         _t(14, 48, _x(card.model_id, 36), 13, weight="bold"),
         _t(14, 63, _x(f"variant {v.name} · {v.hash}", 52), 9.5, fill="#333"),
         _t(14, 76, _x("; ".join(v.steps) or "steps: see label.json", 62), 7.5, fill="#666"),
         '<line x1="14" y1="84" x2="286" y2="84" stroke="#1a1a1a" stroke-width="0.8"/>']
    y = 97.0
    p.append(_t(14, y, _x(f"Relative class: EEI vs uncompressed baseline · {_scheme_name(card.relative)}", 64),
                7.5, fill="#555"))
    if est:
        p += ['<rect x="14" y="103" width="272" height="19" fill="#fff3cd" stroke="#c4001a" stroke-width="1.2"/>',
              _t(150, 116.5, "ESTIMATE — not a measured label", 10.5, weight="bold", fill="#c4001a",
                 anchor="middle")]
        y += 26
    bars, rows = _bars(card.relative_scheme, y + 7)
    p += bars + _marker(card.relative, card.relative_scheme, rows, est)
    if est:
        p.append(_t(118, rows[len(rows) // 2] + 14, "ESTIMATE", 40, weight="bold", fill="#c4001a",
                    anchor="middle", extra=f' opacity="0.16" transform="rotate(-20 118 {rows[len(rows) // 2]:g})"'))
    y = rows[-1] + 22
    p.append(f'<line x1="14" y1="{y:g}" x2="286" y2="{y:g}" stroke="#1a1a1a" stroke-width="0.8"/>')
    y += 24
    jpt = f"{'~' if c.tier == 'E1' else ''}{_n(c.joules_per_token)} J/token"
    p.append(_t(14, y, _x(jpt), 19, weight="bold"))
    tier_txt = f"tier {c.tier} · {_TIER_SHORT[c.tier]}"
    p.append(_t(286, y - 8, _x(tier_txt, 34), 7.5, weight="bold",
                fill="#c4001a" if c.tier == "E1" else "#1a1a1a", anchor="end"))
    p.append(_t(286, y + 1, _x(f"95% CI {_ci(c.joules_per_token_ci)}", 30), 7.5, fill="#333", anchor="end"))
    y += 13
    p.append(_t(14, y, _x(f"decode {_n(c.decode_joules_per_token)} J/tok · prefill "
                         f"{_n(c.prefill_joules_per_prompt_token)} J per prompt token", 62), 7.5, fill="#555"))
    y += 6
    for label, value in _info_rows(card):
        y += 13.5
        p.append(_t(14, y, _x(label), 7.5, weight="bold", fill="#555"))
        p.append(_t(62, y, _x(value, 47), 8.5))
    p.append(_t(14, _H - 10, _x(f"greenopt {card.greenopt_version} · {card.date}", 60), 7, fill="#777"))
    p.append(_t(286, _H - 10, f"card v{card.card_version}", 7, fill="#777", anchor="end"))
    p.append("</svg>")
    return "\n".join(p) + "\n"
