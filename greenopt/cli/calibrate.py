"""Handler for ``calibrate``: this machine's noise floor from A/A comparisons."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from greenopt.calibrate import CalibrateSpec, calibrate, estimate_s, in_run_coverage
from greenopt.cli.common import (
    console,
    emit_json,
    out,
    progress_bars,
    thread_count,
    whole,
)
from greenopt.measure import noise

EPILOG = """examples:
  greenopt calibrate                          # 5 A/A comparisons, protocol cpu, the default model
  greenopt calibrate --comparisons 10 --threads 2
  greenopt calibrate --show                   # the floors stored on this machine

Each comparison measures the model against a fresh copy of itself (A B A B) in a new process.
The sd of the K log EEIs is stored per machine, meter, protocol and thread count under
$GREENOPT_HOME/calibration and widens every reported interval measured the same way; until then
an estimate (tier E1) carries a stated default floor of 0.08 and a counter none.
"""


def add_parsers(sub) -> None:
    """Adds ``calibrate`` to the parser tree."""
    p = sub.add_parser("calibrate", help="measure this machine's noise floor (A/A comparisons in fresh processes)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the model to compare with itself (default: default)")
    p.add_argument("--comparisons", type=whole(5, 50), default=5, help="A/A comparisons, 5 to 50 (default 5)")
    p.add_argument("--protocol", default="cpu", help="protocol preset the floor is for (default: cpu)")
    p.add_argument("--meter", default="auto", help="auto, nvml, rapl or estimate (default: auto)")
    p.add_argument("--cpu-watts", type=float, help="watts per busy core for the estimate meter")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--show", action="store_true", help="list the stored floors and exit")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_calibrate(args) -> int:
    if args.show:
        return _show(args.json)
    spec = CalibrateSpec(model=args.model, comparisons=args.comparisons, protocol=args.protocol, meter=args.meter,
                         cpu_watts=args.cpu_watts, device=args.device, threads=args.threads)
    if not args.json:
        console.print(f"calibrating: {spec.comparisons} A/A comparisons under {spec.resolved_protocol().id}, "
                      f"about {estimate_s(spec) / 60:.0f} min (time nothing else meanwhile)")
    with progress_bars(not args.json) as progress:
        floor = calibrate(spec, progress=progress)
    if args.json:
        emit_json(json.loads(floor.model_dump_json()) | {"path": str(noise.calibration_dir() / f"{floor.key}.json")})
        return 0
    runs = ", ".join(f"{e:.1f}" for e in floor.eeis)
    out.print(f"noise floor: sd {floor.log_sd:.4f} of log EEI (about ±{196 * floor.log_sd:.1f}% at 95%) "
              f"over {len(floor.eeis)} A/A comparisons: EEI {runs}")
    out.print(f"  {floor.meter} (tier {floor.tier}), {floor.protocol_id}, {floor.threads} threads, "
              f"{floor.machine}; {floor.wall_s:.0f} s")
    out.print(f"  in-run intervals holding 100: {in_run_coverage(floor):.0%} "
              "(far below 95% means one comparison's own interval is too narrow here)")
    out.print(f"  stored in {noise.calibration_dir() / (floor.key + '.json')}")
    return 0


def _show(as_json: bool) -> int:
    floors = noise.stored_floors()
    if as_json:
        emit_json([json.loads(f.model_dump_json()) for f in floors])
        return 0
    if not floors:
        out.print(f"no noise floor stored in {noise.calibration_dir()}; run greenopt calibrate")
        return 0
    t = Table("created", "meter", "tier", "protocol", "threads", "K", "sd log EEI", "machine")
    for f in floors:
        t.add_row(f.created, f.meter, f.tier, f.protocol_id, str(f.threads), str(len(f.eeis)), f"{f.log_sd:.4f}",
                  f.machine)
    out.print(t)
    return 0


HANDLERS = {"calibrate": cmd_calibrate}
