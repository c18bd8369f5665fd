"""Renders an SVG (e.g. a label card's label.svg) to PNG with headless Chromium.

    python scripts/render_svg.py out/label.svg out/label.png
    python scripts/render_svg.py --example m1 docs/label-example     # writes .svg and .png

``--example m1|e1`` builds a label card from fixed, illustrative figures (a depth-pruned
SmolLM2-135M on an H100 for m1; a CPU estimate for e1) to show what a card looks like; they
are not a measurement. Needs the Debian ``chromium`` package (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("render_svg")

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars", "--default-background-color=00000000"]


def render_png(svg: Path, png: Path, scale: float = 2.0) -> Path:
    """Screenshots ``svg`` at its own width/height times ``scale`` into ``png``."""
    import xml.etree.ElementTree as ET

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("chromium not found; install it with: apt-get install -y chromium")
    root = ET.parse(svg).getroot()
    _, _, w, h = (float(v) for v in root.attrib["viewBox"].split())
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(f'<!doctype html><html><body style="margin:0">'
                        f'<img src="{svg.resolve().as_uri()}" width="{w:g}" height="{h:g}"></body></html>')
        cmd = [browser, *_FLAGS, f"--user-data-dir={tmp}/profile", f"--force-device-scale-factor={scale:g}",
               f"--window-size={int(w)},{int(h)}", f"--screenshot={png.resolve()}", page.as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return png


def example_card(kind: str):
    """A label card from fixed illustrative figures (not a measurement)."""
    from greenopt.label.card import build_card
    from greenopt.records import (
        ApplyReport,
        Comparison,
        DeviceInfo,
        EnergyMeasurement,
        EvalResult,
        RuntimeInfo,
        StepReport,
        TaskScore,
        TrialFigures,
    )

    if kind == "m1":
        dev = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", meter="nvml",
                         boundary="GPU board (NVML)", driver="570.124.06", power_limit_w=700.0)
        base_j, cand_j, base_tps, cand_tps, idle, tier, pid = 2.10, 1.31, 61.5, 87.9, 68.0, "M1", "GO-1/b1"
        eei_ci, runtime = (59.8, 65.1), dict(attention="sdpa", dtype="bfloat16", prompt_tokens=256, new_tokens=256)
    else:
        dev = DeviceInfo(kind="cpu", name="Intel Xeon (2 cores)", meter="estimate",
                         boundary="CPU cores, estimated from TDP (no counter)")
        base_j, cand_j, base_tps, cand_tps, idle, tier, pid = 1.25, 0.98, 15.6, 19.8, None, "E1", "GO-1/b1/p64-n32"
        eei_ci, runtime = (74.9, 82.6), dict(attention="sdpa", dtype="float32", prompt_tokens=64, new_tokens=32)

    def meas(j: float, tps: float) -> EnergyMeasurement:
        trials = tuple(TrialFigures(energy_j=j * 512 * f, duration_s=512 / tps, generated_tokens=512,
                                    prompt_tokens=512) for f in (0.99, 1.0, 1.01, 0.995, 1.005))
        return EnergyMeasurement(joules_per_token=j, joules_per_token_ci=(j * 0.985, j * 1.015), trials=trials,
                                 decode_joules_per_token=j * 0.93, prefill_joules_per_prompt_token=j * 0.07,
                                 tokens_per_s=tps, mean_power_w=j * tps, idle_power_w=idle, cv=0.011, tier=tier,
                                 source_tier=tier, device=dev, protocol_id=pid)

    comp = Comparison(eei=100 * cand_j / base_j, eei_ci=eei_ci, baseline=meas(base_j, base_tps),
                      candidate=meas(cand_j, cand_tps))

    def ev(arc: float, piqa: float) -> EvalResult:
        return EvalResult(scores=(TaskScore(task="arc_easy", metric="acc", value=arc, n=500),
                                  TaskScore(task="piqa", metric="acc", value=piqa, n=500)), limit=500, seed=1234)

    step = StepReport(kind="depth", summary="depth: dropped 8 of 30 decoder layers (angular distance)",
                      modules=8, params_before=134_515_008, params_after=106_197_312,
                      weight_bytes_before=269_030_016, weight_bytes_after=212_394_624)
    report = ApplyReport(variant_hash="3f2a9c1e4b5d", steps=(step,), params_before=step.params_before,
                         params_after=step.params_after, weight_bytes_before=step.weight_bytes_before,
                         weight_bytes_after=step.weight_bytes_after, bits_per_layer={}, sparsity=0.0,
                         flops_per_token_before=269_000_000, flops_per_token_after=212_000_000, fast_kernel=None)
    return build_card(apply_report=report, model_id="HuggingFaceTB/SmolLM2-135M-Instruct", variant_name="depth-8",
                      variant_hash="3f2a9c1e4b5d", comparison=comp, candidate_eval=ev(0.561, 0.648),
                      baseline_eval=ev(0.584, 0.671), absolute_scheme="absolute-go1",
                      runtime=RuntimeInfo(torch="2.13.0", transformers="5.23.0", batch_size=1, **runtime),
                      date="2026-03-02T10:15:00+00:00")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="SVG file, or with --example the output stem (no suffix)")
    ap.add_argument("png", nargs="?", help="PNG to write (default: beside the SVG)")
    ap.add_argument("--example", choices=["m1", "e1"], help="write an example card first")
    ap.add_argument("--scale", type=float, default=2.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = Path(a.src)
    if a.example:
        from greenopt.label.card import render_svg

        src = src.with_suffix(".svg")
        src.write_text(render_svg(example_card(a.example)))
    png = Path(a.png) if a.png else src.with_suffix(".png")
    render_png(src, png, a.scale)
    log.info("wrote %s", png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
