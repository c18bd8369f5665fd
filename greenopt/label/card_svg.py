"""The label card as an SVG that looks like an EU appliance energy label (A-G arrows)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from greenopt.label import EU_INK as _INK
from greenopt.label import EU_PALETTE as _PALETTE
from greenopt.label import LabelScheme, text
from greenopt.records import Grade

if TYPE_CHECKING:
    from greenopt.records import LabelCard
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
        absolute = f"class {card.absolute.display} · {text.scheme_name(card.absolute)}"
    else:
        absolute = f"not graded: {card.absolute_note}"
    rows = [("Absolute", absolute),
            ("EEI", f"{text.num(rel.value)} (95% CI {text.interval(rel.interval)}) vs baseline {text.num(b.joules_per_token)} J/tok"),
            ("Speed", f"{text.num(c.tokens_per_s)} tok/s · {text.num(c.mean_power_w)} W mean · "
                      + (f"{text.num(c.idle_power_w)} W idle" if c.idle_power_w is not None else "idle n/a"))]
    acc = [f"{t.task} {text.score(t, t.value)} (base {text.score(t, t.baseline)}, {text.delta(t)})" for t in card.accuracy]
    if len(acc) > 2:
        acc[1:] = [f"+{len(acc) - 1} more tasks: " + ", ".join(t.task for t in card.accuracy[1:])]
    rows += [("" if i else "Accuracy", line) for i, line in enumerate(acc or ["not evaluated"])]
    est = " (est.)" if card.carbon.estimated else ""
    rows += [("Carbon", f"{card.carbon.g_per_1k_tokens:.3g} g CO₂e / 1000 tok{est} @ "
                        f"{text.num(card.carbon.intensity_g_per_kwh)} g/kWh"),
             ("Device", f"{d.name}" + (f" · {text.num(d.power_limit_w)} W limit" if d.power_limit_w else "")),
             ("Boundary", d.boundary + (f" · driver {d.driver}" if d.driver else "")),
             ("Trials", f"{c.trials} + {b.trials} baseline · CV {c.cv * 100:.1f}% / {b.cv * 100:.1f}%"),
             ("Validity", "all checks passed" if not card.flags else "failed: " + ", ".join(card.flags)),
             ("Runtime", f"torch {r.torch} · transformers {r.transformers}"),
             ("", f"{r.attention} attention · {r.dtype} · batch {r.batch_size}"),
             ("Protocol", f"{card.protocol_id} · {r.prompt_tokens}+{r.new_tokens} tok · {text.scheme_name(rel)}")]
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
    p.append(_t(14, y, _x(f"Relative class: EEI vs uncompressed baseline · {text.scheme_name(card.relative)}", 64),
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
    jpt = f"{'~' if c.tier == 'E1' else ''}{text.num(c.joules_per_token)} J/token"
    p.append(_t(14, y, _x(jpt), 19, weight="bold"))
    tier_txt = f"tier {c.tier} · {_TIER_SHORT[c.tier]}"
    p.append(_t(286, y - 8, _x(tier_txt, 34), 7.5, weight="bold",
                fill="#c4001a" if c.tier == "E1" else "#1a1a1a", anchor="end"))
    p.append(_t(286, y + 1, _x(f"95% CI {text.interval(c.joules_per_token_ci)}", 30), 7.5, fill="#333", anchor="end"))
    y += 13
    p.append(_t(14, y, _x(f"decode {text.num(c.decode_joules_per_token)} J/tok · prefill "
                         f"{text.num(c.prefill_joules_per_prompt_token)} J per prompt token", 62), 7.5, fill="#555"))
    y += 6
    for label, value in _info_rows(card):
        y += 13.5
        p.append(_t(14, y, _x(label), 7.5, weight="bold", fill="#555"))
        p.append(_t(62, y, _x(value, 47), 8.5))
    p.append(_t(14, _H - 10, _x(f"greenopt {card.greenopt_version} · {card.date}", 60), 7, fill="#777"))
    p.append(_t(286, _H - 10, f"card v{card.card_version}", 7, fill="#777", anchor="end"))
    p.append("</svg>")
    return "\n".join(p) + "\n"
