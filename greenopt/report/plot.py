"""Rendering a search result: the front table (rich), the Pareto plot (PNG, HTML).

``render_front(result)`` gives a rich Table of the front for the CLI.

``write_plots(result, scheme, run_dir)`` writes ``pareto.png`` (matplotlib) and
``pareto.html`` (one self-contained file: inline SVG plus a few lines of JavaScript for
hover details and a clickable table; no CDN, opens offline). Each class of the scheme is a
coloured vertical band over the energy axis; every measured trial is a dot with its 95%
interval as a horizontal bar, the front is joined by a line, the baseline is a square and
the chosen variant a star.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Any

from greenopt._io import write_bytes, write_text
from greenopt.label import EU_PALETTE, LabelScheme
from greenopt.records import SearchResult


def band_colour(i: int, n: int) -> str:
    """Colour of class ``i`` of ``n`` (best first), spread over the EU label palette."""
    k = round(i * (len(EU_PALETTE) - 1) / max(1, n - 1))
    return EU_PALETTE[k]


def bands(scheme: LabelScheme, x_max: float, x_min: float = 0.0) -> list[tuple[str, float, float, str]]:
    """(letter, low, high, colour) for each class, the open class cut at ``x_max``."""
    out, lo = [], x_min
    for i, c in enumerate(scheme.classes):
        hi = x_max if c.max is None else min(float(c.max), x_max)
        if hi > lo:
            out.append((c.letter, lo, hi, band_colour(i, len(scheme.classes))))
        lo = max(lo, hi)
    return out


def _x_range(result: SearchResult, scheme: LabelScheme) -> tuple[float, float, bool]:
    his = [r.energy_ci[1] for r in result.trials] or [1.0]
    los = [r.energy_ci[0] for r in result.trials] or [1.0]
    if scheme.relative:
        return 0.0, max(130.0, 1.1 * max(his)), False
    lo = min(min(los) / 1.5, float(scheme.classes[0].max or 1) / 2)
    return max(lo, 1e-6), 1.5 * max(his), True


def write_plots(result: SearchResult, scheme: LabelScheme, folder: str | Path) -> dict[str, str]:
    """Writes ``pareto.png`` and ``pareto.html`` into ``folder`` (a run dir); returns their paths."""
    png, page = Path(folder) / "pareto.png", Path(folder) / "pareto.html"
    write_bytes(png, png_bytes(result, scheme))
    write_text(page, html_page(result, scheme))
    return {"png": str(png), "html": str(page)}


def png_bytes(result: SearchResult, scheme: LabelScheme) -> bytes:
    """The PNG plot as bytes (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x0, x1, log_x = _x_range(result, scheme)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for letter, lo, hi, colour in bands(scheme, x1, x0):
        ax.axvspan(lo, hi, color=colour, alpha=0.18, lw=0)
        ax.text(math.sqrt(lo * hi) if log_x else (lo + hi) / 2, 1.0, letter, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=10, fontweight="bold")
    rows = result.trials
    for r in rows:
        ax.errorbar(r.energy, r.mean_accuracy, xerr=[[r.energy - r.energy_ci[0]], [r.energy_ci[1] - r.energy]],
                    fmt="o", ms=4, color="#888888", alpha=0.7, lw=0.8)
    front = sorted(result.front, key=lambda r: r.energy)
    if front:
        ax.plot([r.energy for r in front], [r.mean_accuracy for r in front], "-o", color="#1f4e9e", ms=6,
                lw=1.5, label="Pareto front")
    if result.baseline:
        ax.plot(result.baseline.energy, result.baseline.mean_accuracy, "s", color="black", ms=8, label="baseline")
    if result.chosen:
        ax.plot(result.chosen.energy, result.chosen.mean_accuracy, "*", color="#d4a017", mec="black", ms=16,
                label=f"chosen (trial {result.chosen.number})")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlim(x0, x1)
    unit = "EEI (100 = baseline)" if scheme.relative else "J/token"
    ax.set_xlabel(unit + (" - estimated (E1)" if result.estimated else ""))
    ax.set_ylabel("mean accuracy")
    ax.set_title(f"{result.study_name}: target {result.target} ({scheme.name})", pad=18)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_front(result: SearchResult) -> Any:
    """The Pareto front as a rich Table (chosen row marked ``*``, baseline ``base``), then the
    confirmed trials off the front (``conf``). "measured" says which figure a row shows: the
    confirmation's fresh comparisons (with the search-time reading beside it) or the search's
    single comparison (an in-run interval)."""
    from rich.table import Table

    unit = "EEI" if result.metric == "eei" else "J/token"
    tasks = list(result.front[0].accuracy) if result.front else []
    title = f"Pareto front: accuracy vs {unit} (target {result.target}, scheme {result.scheme})"
    table = Table(title=title)
    for col in ["", "trial", "variant", *tasks, "mean acc (vs base, paired 95%)", "items", "J/token [95%]",
                "EEI [95%]", "class", "measured", "MB", "tok/s"]:
        table.add_column(col, justify="left" if col in ("variant", "class", "measured") else "right")
    on_front = {r.number for r in result.front}
    extra = [r for r in result.trials if r.confirmed and r.number not in on_front]
    for r in [*result.front, *extra]:
        mark = "*" if r.chosen else ("base" if r.is_baseline else ("conf" if r.number not in on_front else ""))
        measured = (f"confirmed (search read {r.search_display})" if r.confirmed
                    else "baseline" if r.is_baseline else "one comparison, in-run")
        drop = ""
        if r.accuracy_drop is not None and not r.is_baseline:
            se = f" ±{196 * r.accuracy_drop_se:.1f}" if r.accuracy_drop_se is not None else ""
            drop = f" ({-100 * r.accuracy_drop:+.1f}{se} pts)"
        table.add_row(
            mark, str(r.number), r.steps, *[f"{r.accuracy.get(t, float('nan')):.3f}" for t in tasks],
            f"{r.mean_accuracy:.3f}{drop}", "all" if r.items_per_task is None else str(r.items_per_task),
            f"{r.joules_per_token:.4g} [{r.joules_per_token_ci[0]:.4g}, {r.joules_per_token_ci[1]:.4g}] {r.tier}",
            f"{r.eei:.1f} [{r.eei_ci[0]:.1f}, {r.eei_ci[1]:.1f}]", r.display, measured,
            f"{r.weight_bytes / 1e6:.1f}" if r.weight_bytes is not None else "-", f"{r.tokens_per_s:.1f}",
        )
    return table


_W, _H, _PAD = 760, 440, 50


def html_page(result: SearchResult, scheme: LabelScheme) -> str:
    """A self-contained HTML page: SVG plot with hover details and a table of the front."""
    x0, x1, log_x = _x_range(result, scheme)
    accs = [r.mean_accuracy for r in result.trials] or [0.0, 1.0]
    y0, y1 = min(accs), max(accs)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 1e-9 else (y0 - 0.1 * (y1 - y0), y1 + 0.1 * (y1 - y0))

    def sx(x: float) -> float:
        if log_x:
            x, a, b = math.log(max(x, 1e-12)), math.log(x0), math.log(x1)
        else:
            a, b = x0, x1
        return _PAD + (x - a) / (b - a) * (_W - 2 * _PAD)

    def sy(y: float) -> float:
        return _H - _PAD - (y - y0) / (y1 - y0) * (_H - 2 * _PAD)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif">']
    for letter, lo, hi, colour in bands(scheme, x1, x0):
        svg.append(f'<rect x="{sx(lo):.1f}" y="{_PAD}" width="{sx(hi) - sx(lo):.1f}" height="{_H - 2 * _PAD}" '
                   f'fill="{colour}" fill-opacity="0.2"/><text x="{(sx(lo) + sx(hi)) / 2:.1f}" y="{_PAD - 6}" '
                   f'text-anchor="middle" font-weight="bold">{html.escape(letter)}</text>')
    front = sorted(result.front, key=lambda r: r.energy)
    if front:
        pts = " ".join(f"{sx(r.energy):.1f},{sy(r.mean_accuracy):.1f}" for r in front)
        svg.append(f'<polyline points="{pts}" fill="none" stroke="#1f4e9e" stroke-width="1.5"/>')
    for r in result.trials:
        cx, cy = sx(r.energy), sy(r.mean_accuracy)
        svg.append(f'<line x1="{sx(r.energy_ci[0]):.1f}" x2="{sx(r.energy_ci[1]):.1f}" y1="{cy:.1f}" y2="{cy:.1f}" '
                   'stroke="#888" stroke-width="1"/>')
        colour = "#d4a017" if r.chosen else ("black" if r.is_baseline else ("#1f4e9e" if r.on_front else "#888"))
        size = 9 if r.chosen else (6 if r.on_front or r.is_baseline else 4)
        shape = (f'<rect x="{cx - size:.1f}" y="{cy - size:.1f}" width="{2 * size}" height="{2 * size}"' if r.is_baseline
                 else f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{size}"')
        svg.append(f'{shape} fill="{colour}" stroke="black" stroke-width="0.5" class="pt" data-n="{r.number}">'
                   f'<title>{html.escape(_tip(r))}</title></{"rect" if r.is_baseline else "circle"}>')
    unit = "EEI (100 = baseline)" if scheme.relative else "J/token (log)"
    svg.append(f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="black"/>'
               f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="black"/>'
               f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle">{unit}</text>'
               f'<text x="14" y="{_H / 2}" transform="rotate(-90 14 {_H / 2})" text-anchor="middle">mean accuracy</text>'
               f'<text x="{_PAD - 4}" y="{_H - _PAD}" text-anchor="end" font-size="10">{y0:.3f}</text>'
               f'<text x="{_PAD - 4}" y="{_PAD + 10}" text-anchor="end" font-size="10">{y1:.3f}</text>'
               f'<text x="{_PAD}" y="{_H - _PAD + 14}" font-size="10">{x0:.3g}</text>'
               f'<text x="{_W - _PAD}" y="{_H - _PAD + 14}" text-anchor="end" font-size="10">{x1:.3g}</text></svg>')
    rows = "".join(
        f'<tr data-n="{r.number}"><td>{"*" if r.chosen else ("base" if r.is_baseline else "")}</td><td>{r.number}</td>'
        f'<td>{html.escape(r.steps)}</td><td>{r.mean_accuracy:.3f}</td><td>{r.energy:.3g} '
        f'[{r.energy_ci[0]:.3g}, {r.energy_ci[1]:.3g}]</td><td>{html.escape(r.display)}</td></tr>' for r in result.front)
    status = (f"chosen: trial {result.chosen.number}, {html.escape(result.chosen.display)}" if result.chosen
              else html.escape(result.unreachable.message if result.unreachable else "no result"))
    data = json.dumps({r.number: _tip(r) for r in result.trials})
    return _PAGE.format(title=html.escape(f"{result.study_name}: target {result.target}"), status=status,
                        svg="\n".join(svg), rows=rows, data=data,
                        note=" Figures are estimates (E1), not measured labels." if result.estimated else "")


def _tip(r: Any) -> str:
    acc = ", ".join(f"{k} {v:.3f}" for k, v in r.accuracy.items())
    return (f"trial {r.number}: {r.steps}\nclass {r.display}; EEI {r.eei:.1f} [{r.eei_ci[0]:.1f}, {r.eei_ci[1]:.1f}]; "
            f"{r.joules_per_token:.4g} J/token ({r.tier})\nmean accuracy {r.mean_accuracy:.3f} ({acc})")


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:20px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} tr.sel{{background:#ffe9a8}}
.pt.sel{{stroke:red;stroke-width:3}} #info{{white-space:pre;font-family:monospace;min-height:3em}}</style></head>
<body><h2>{title}</h2><p>{status}.{note}</p>
{svg}
<div id="info">Hover or click a point.</div>
<table><tr><th></th><th>trial</th><th>variant</th><th>mean acc</th><th>energy [95%]</th><th>class</th></tr>{rows}</table>
<script>
const tips = {data};
function pick(n) {{
  document.querySelectorAll('.sel').forEach(e => e.classList.remove('sel'));
  document.querySelectorAll('[data-n="' + n + '"]').forEach(e => e.classList.add('sel'));
  document.getElementById('info').textContent = tips[n] || '';
}}
document.querySelectorAll('[data-n]').forEach(e => {{
  e.addEventListener('click', () => pick(e.dataset.n));
  if (e.classList.contains('pt')) e.addEventListener('mouseenter', () => pick(e.dataset.n));
}});
</script></body></html>
"""
