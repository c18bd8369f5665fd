"""CLI for shipping a variant: ``apply``, ``export``, ``verify``, ``label``, ``recipe validate``.

``add_parsers(sub, add_measure_args)`` adds the subcommands; ``HANDLERS`` maps each command
name to its handler (argparse namespace in, exit code out). Handlers raise GreenoptError for
one-line input errors; ``verify`` prints its own one-line verdict and exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from greenopt.cli.common import (
    add_include_path,
    check_writable,
    emit_json,
    progress_bars,
    thread_count,
    whole,
    write_card_folder,
)
from greenopt.cli.common import out as stdout
from greenopt.compress import apply
from greenopt.config import load_variant
from greenopt.config.recipe import Recipe, load_recipe
from greenopt.env import resolve_dtype, set_threads
from greenopt.errors import ConfigError
from greenopt.label.card import load_card, write_card
from greenopt.models import load_model
from greenopt.runtimes import cast
from greenopt.ship import (
    ExportProvenance,
    VerifySpec,
    export,
    export_run,
    load_manifest,
    verify,
)
from greenopt.ship.exporter import MANIFEST, check_target
from greenopt.ship.readme import how_to_load, write_readme
from greenopt.validate import validate_file

EPILOG_VERIFY = """examples:
  greenopt verify exports/int4 --target B --max-drop 0.01
  greenopt verify exports/int4 --target B --max-drop 0.01 --require-tier M1 --meter nvml
  greenopt verify recipes/ci/pinned-depth4.yaml --target E --max-drop 0.03
  greenopt verify exports/int4 --target B --allow-estimate   # no RAPL/NVML here: accept tier E1

An estimate (tier E1) never passes unless --allow-estimate (or gate.allow_estimate in the recipe)
says so, and a pass on one says it was estimated.

exit status: 0 when every check passes; 1 with one line on stderr naming the first failure
(class worse than the target at the worse end of its interval, accuracy drop over budget,
tier below --require-tier, an estimate without --allow-estimate, a changed protocol, a missing task or
no measurement).
"""

EPILOG_APPLY = """examples:
  greenopt apply --model default --variant recipes/variants/hqq4-ffn.yaml --out exports/hqq4
  greenopt apply recipes/ci/pinned-depth4.yaml --out exports/depth-4
"""


def add_parsers(sub) -> None:
    """Adds ``apply``, ``export``, ``verify``, ``label`` and ``recipe`` to the subparser tree."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("apply", help="apply one variant to a model and write a checkpoint (no measurement)",
                       epilog=EPILOG_APPLY, formatter_class=fmt)
    p.add_argument("recipe", nargs="?", help="a recipe that pins a variant (instead of --model/--variant)")
    p.add_argument("--model", help="'default', a transformers folder, or a hub id")
    p.add_argument("--variant", help="variant YAML file")
    p.add_argument("--out", help="export folder (default: the recipe's export.out)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the recipe's, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on cpu)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    _common_export_args(p)

    p = sub.add_parser("export", help="export a search trial with its label card as a checkpoint")
    p.add_argument("run_dir", help="the search's run folder, runs/NAME")
    p.add_argument("--pick", default="best", help="trial number, or 'best' for the chosen one (default)")
    p.add_argument("--out", required=True, help="export folder to create")
    p.add_argument("--device", default="cpu", help="where to re-apply the variant (the search's device kind)")
    _common_export_args(p)

    p = sub.add_parser("verify", help="CI gate: re-measure an export or recipe, fail unless it keeps its label",
                       epilog=EPILOG_VERIFY, formatter_class=fmt)
    p.add_argument("source", help="an export folder, or a recipe file that pins a variant")
    p.add_argument("--target", help="worst acceptable relative class, e.g. B (default: recorded gate target)")
    p.add_argument("--max-drop", type=float, help="accuracy budget per task, 0.01 = one point")
    p.add_argument("--require-tier", choices=("M1", "M2", "E1"), help="weakest acceptable measurement tier")
    p.add_argument("--allow-estimate", action=argparse.BooleanOptionalAction, default=None,
                   help="accept a tier-E1 estimate where no energy counter can be read (default: the recorded "
                        "gate's allow_estimate, else refuse); the verdict repeats it")
    p.add_argument("--protocol", help="protocol preset; must equal the recorded one (default: recorded)")
    p.add_argument("--tasks", nargs="*", help="accuracy tasks (default: the recorded ones)")
    add_include_path(p)
    p.add_argument("--limit", type=whole(1, note=" (leave --limit out for the recorded limit)"),
                   help="items per task (default: the recorded limit)")
    p.add_argument("--baseline", help="where the base model is now (default: the recorded --model)")
    p.add_argument("--meter", default="auto", help="auto, nvml, rapl or estimate (default: auto)")
    p.add_argument("--cpu-watts", type=float, help="watts per busy core for the estimate meter")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: recorded)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads")
    p.add_argument("--card-out", help="also write the re-measured label card to this folder")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")

    p = sub.add_parser("label", help="re-render an export's label card (LABEL.md, label.svg, README) from label.json")
    p.add_argument("folder", help="an export folder holding label.json")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")

    p = sub.add_parser("recipe", help="work with recipe files")
    rsub = p.add_subparsers(dest="recipe_command", metavar="ACTION")
    v = rsub.add_parser("validate", help="check recipes: schema, cross-field rules, and a dry run on a tiny model")
    v.add_argument("files", nargs="+", help="recipe YAML files")
    v.add_argument("--no-dry-run", action="store_true", help="skip applying a variant to a tiny twin model")
    v.add_argument("--json", action="store_true", help="machine-readable report")


def _common_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing greenopt export at --out")
    p.add_argument("--check", action="store_true", help="reload the export and compare logits before keeping it")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


# ---------------------------------------------------------------------------- handlers


def cmd_apply(args) -> int:
    import torch


    recipe: Recipe | None = None
    if args.recipe:
        if args.model or args.variant:
            raise ConfigError("give a recipe or --model/--variant, not both")
        recipe = load_recipe(args.recipe)
        if recipe.variant is None:
            raise ConfigError(f"{args.recipe} runs a search; apply needs a recipe that pins a variant "
                              "(run greenopt search, then greenopt export)")
        model_spec, variant, source = recipe.model.id, recipe.variant, args.recipe
    elif args.model and args.variant:
        model_spec, variant, source = args.model, load_variant(args.variant), args.variant
    else:
        raise ConfigError("apply needs a recipe file, or both --model and --variant")
    out = args.out or (recipe.export.out if recipe else None)
    if not out:
        raise ConfigError("no output folder: pass --out (or set export.out in the recipe)")
    _refuse_existing(out, args.force)
    set_threads(args.threads)
    device = args.device or (recipe.model.device if recipe and recipe.model.device != "auto" else "cpu")
    dtype = resolve_dtype(args.dtype or (recipe.model.dtype if recipe else None), device)
    calib = recipe.calibration if recipe else None
    model, tok, info = load_model(model_spec, dtype=dtype, device=device,
                                  trust_remote_code=bool(recipe and recipe.model.trust_remote_code))
    torch.manual_seed(calib.seed if calib else 0)

    cast(model, variant.deploy)  # the steps see the deployment's dtype, as measurement applies them
    with progress_bars(not args.json) as progress:
        report = apply(model, variant, tokenizer=tok, calib=calib, progress=progress)
    prov = ExportProvenance(
        base_model=model_spec, base_model_id=info.model_id, apply_report=report, dtype=dtype, source=source,
        seeds={"torch": calib.seed if calib else 0},
        **(_recipe_provenance(recipe) if recipe else {}))
    manifest = export(model, tok, variant, None, out, args.force, provenance=prov, check_reload=args.check)
    return _print_manifest(manifest, out, args.json)


def _recipe_provenance(recipe) -> dict:
    return dict(protocol=recipe.resolved_protocol(), eval=recipe.evaluation.eval_spec(),
                calib=recipe.calibration, gate=recipe.gate, **recipe.label_spec().model_dump())


def _refuse_existing(out: str, force: bool) -> None:
    # Fail before loading a model: export() checks again when it writes.
    check_target(Path(out), force)
    check_writable(out, "--out")


def cmd_export(args) -> int:
    _refuse_existing(args.out, args.force)
    with progress_bars(not args.json) as progress:
        manifest = export_run(args.run_dir, args.out, pick=args.pick, force=args.force, check_reload=args.check,
                              device=args.device, progress=progress)
    return _print_manifest(manifest, args.out, args.json)


def _print_manifest(manifest, out: str, as_json: bool) -> int:
    if as_json:

        emit_json({"out": str(out), "manifest": json.loads(manifest.model_dump_json())})
        return 0
    info = manifest.variant_info
    stdout.print(f"[bold]exported[/bold] {manifest.variant_name} ({manifest.variant.hash}) of "
                 f"{manifest.base_model_id} to {out}")
    if info.weight_bytes_before is not None:
        stdout.print(f"  weight bytes {info.weight_bytes_before:,} -> {info.weight_bytes_after:,}")
    stdout.print(f"  {how_to_load(manifest).replace('`', '')}")
    stdout.print(f"  weights sha256 {manifest.weights_sha256[:16]}…; label card: "
                 + ("label.json, LABEL.md, label.svg" if manifest.card_protocol_id else "none (not measured)"))
    return 0


def cmd_verify(args) -> int:
    if args.card_out:
        check_writable(args.card_out, "--card-out")
    spec = VerifySpec(source=args.source, target=args.target, max_drop=args.max_drop,
                      require_tier=args.require_tier, allow_estimate=args.allow_estimate, protocol=args.protocol,
                      tasks=tuple(args.tasks) if args.tasks is not None else None, limit=args.limit,
                      include_path=args.include_path, baseline=args.baseline, meter=args.meter, cpu_watts=args.cpu_watts, device=args.device,
                      dtype=args.dtype, threads=args.threads)
    with progress_bars(not args.json) as progress:
        result = verify(spec, progress=progress)
    if args.card_out and result.card is not None:
        write_card_folder(result.card, args.card_out)
    if args.json:

        emit_json(json.loads(result.model_dump_json(exclude={"card"})))
    elif result.passed:
        stdout.print(f"[green]PASS[/green] {result.reason}")
    if not result.passed:
        print(f"greenopt: verify failed: {result.reason}", file=sys.stderr)
        return 1
    return 0


def cmd_label(args) -> int:
    folder = Path(args.folder)
    if folder.is_file():
        raise ConfigError(f"{folder} is a file; pass the export folder that holds label.json")
    card = load_card(folder)
    check_writable(folder, "folder")
    paths = write_card(card, folder)
    manifest = load_manifest(folder) if (folder / MANIFEST).is_file() else None
    paths["readme"] = write_readme(folder, card, manifest)
    if args.json:

        emit_json({k: str(v) for k, v in paths.items()})
    else:
        stdout.print(f"{card.relative.display} · re-rendered " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_recipe(args) -> int:
    if args.recipe_command != "validate":
        raise ConfigError("recipe needs an action: greenopt recipe validate FILE...")
    reports = [validate_file(f, dry_run=not args.no_dry_run) for f in args.files]
    if args.json:

        emit_json([{"path": r.path, "ok": r.ok, "issues": [i.model_dump() for i in r.issues],
                    "notes": list(r.notes)} for r in reports])
    else:
        for r in reports:
            if r.ok:
                stdout.print(f"OK {r.path}" + "".join(f"\n  [dim]{n}[/dim]" for n in r.notes))
            for issue in r.issues:
                print(issue.line(r.path), file=sys.stderr)
    return 0 if all(r.ok for r in reports) else 1


HANDLERS = {"apply": cmd_apply, "export": cmd_export, "verify": cmd_verify, "label": cmd_label,
            "recipe": cmd_recipe}
