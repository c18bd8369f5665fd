"""Calibrate: this machine's noise floor, from K A/A comparisons each in a fresh process.

The library side of ``greenopt calibrate``: ``calibrate(CalibrateSpec(...)) -> NoiseFloor``.
Each comparison loads the model in a new Python process (spawned, so no state carries over),
measures it against a fresh deep copy of itself under the protocol (A B A B, its own starting
side and prompt order), and sends the comparison back. The floor is the sample sd of the K log
EEIs: what a rerun of the same measurement moves by on this machine, which a single
comparison's in-run interval cannot see. It is stored per machine, meter, protocol and thread
count (:mod:`greenopt.measure.noise`) and widens every reported interval measured that way.

Example:
    >>> from greenopt.calibrate import CalibrateSpec, calibrate
    >>> floor = calibrate(CalibrateSpec(protocol="cpu", comparisons=5))  # doctest: +SKIP
    >>> round(floor.log_sd, 3)                                           # doctest: +SKIP
    0.031
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
from pydantic import Field

from greenopt.config import Protocol, ProtocolRef, RuntimeSpec, as_protocol
from greenopt.env import resolve_device, resolve_dtype, set_threads
from greenopt.errors import GreenoptError, MeterError
from greenopt.measure import noise
from greenopt.measure.select import select_meter
from greenopt.measure.workload import compare
from greenopt.models import load_model
from greenopt.records import Comparison, NoiseFloor

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
MIN_COMPARISONS = 5


class CalibrateSpec(RuntimeSpec):
    """What to calibrate: the model and where it runs (:class:`RuntimeSpec`; ``threads`` None
    takes torch's default in the worker), the protocol, and K = ``comparisons`` (at least 5)."""

    protocol: ProtocolRef = "cpu"
    comparisons: int = Field(MIN_COMPARISONS, ge=MIN_COMPARISONS, le=50)

    def resolved_protocol(self) -> Protocol:
        return as_protocol(self.protocol)


def estimate_s(spec: CalibrateSpec) -> float:
    """A rough wall time for the whole calibration, from the protocol's minimum durations.

    Per comparison: both sides' warm-up and trials at their minimum lengths, the two prefill
    windows, the idle window and about 20 s to start a process and load the model.
    """
    p = spec.resolved_protocol()
    per_side = p.warmup_min_s + p.trials * p.trial_min_s + 0.5 * p.trial_min_s
    return spec.comparisons * (2 * per_side + 1.0 + 20.0)


def needs_calibration(spec: CalibrateSpec) -> bool:
    """True when no floor is stored for this machine, the spec's meter, protocol and thread count.

    ``greenopt measure`` calibrates on first use when this holds (unless ``--no-calibrate`` or
    ``GREENOPT_AUTO_CALIBRATE=0``).
    """
    meter = select_meter(spec.meter, cpu_watts=spec.cpu_watts, device=resolve_device(spec.device))
    threads = spec.threads or torch.get_num_threads()
    return noise.load_floor(meter.name, spec.resolved_protocol().id, threads) is None


def calibrate(spec: CalibrateSpec, *, progress: Progress | None = None, isolate: bool = True) -> NoiseFloor:
    """Runs ``spec.comparisons`` A/A comparisons in fresh processes and stores the noise floor.

    Args:
        spec: model, device, meter, threads, protocol and K.
        progress: ``progress(stage, done, total)``, called as each comparison ends.
        isolate: run each comparison in a fresh spawned process (False: in this process, for
            tests; the floor then misses what differs between processes).

    Returns:
        The stored floor (also written under :func:`greenopt.measure.noise.calibration_dir`).

    Raises:
        GreenoptError: bad input, an unusable meter, a failed comparison, or an unwritable
            calibration folder (nothing is stored then).
    """
    protocol = spec.resolved_protocol()
    meter = select_meter(spec.meter, cpu_watts=spec.cpu_watts, device=resolve_device(spec.device))
    threads = spec.threads or torch.get_num_threads()
    payload = spec.model_copy(update={"threads": threads}).model_dump_json()
    run = _in_fresh_process if isolate else aa_comparison
    runs: list[Comparison] = []
    t0 = time.monotonic()
    _report(progress, 0, spec.comparisons)
    for k in range(spec.comparisons):
        runs.append(Comparison.model_validate_json(run(payload)))
        _report(progress, k + 1, spec.comparisons)
    wall_s = time.monotonic() - t0
    logs = np.log([c.eei for c in runs])
    tier = max((c.tier for c in runs), key=("M1", "M2", "E1").index)
    floor = NoiseFloor(
        key=noise.floor_key(meter.name, protocol.id, threads), machine=noise.machine(),
        cpu_flags=noise.cpu_flags(), meter=meter.name, tier=tier, protocol_id=protocol.id, threads=threads,
        model_id=spec.model, eeis=tuple(float(c.eei) for c in runs),
        in_run_intervals=tuple(c.eei_ci for c in runs), log_sd=float(np.std(logs, ddof=1)),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), wall_s=round(wall_s, 1))
    noise.save_floor(floor)
    log.info("noise floor sd %.4f of log EEI over %d A/A comparisons (%s, %s, %d threads)", floor.log_sd,
             len(runs), meter.name, protocol.id, threads)
    return floor


def in_run_coverage(floor: NoiseFloor) -> float:
    """Share of the A/A comparisons whose own in-run interval holds 100 (a sanity figure: well
    under 0.95 means the in-run interval alone is too narrow on this machine)."""
    held = [lo <= 100.0 <= hi for lo, hi in floor.in_run_intervals]
    return sum(held) / len(held) if held else math.nan


def aa_comparison(payload: str) -> str:
    """One A/A comparison, run inside a fresh worker process; returns the Comparison as JSON."""
    spec = CalibrateSpec.model_validate_json(payload)
    set_threads(spec.threads)
    device = resolve_device(spec.device)
    model, tok, _ = load_model(spec.model, dtype=resolve_dtype(spec.dtype, device), device=device,
                               trust_remote_code=spec.trust_remote_code)
    twin = copy.deepcopy(model)  # fresh memory, the same weights: an A/A pair
    meter = select_meter(spec.meter, cpu_watts=spec.cpu_watts, device=device)
    return compare(model, twin, tok, spec.resolved_protocol(), meter).model_dump_json()


def _in_fresh_process(payload: str) -> str:
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_quiet_worker) as pool:
            return pool.submit(aa_comparison, payload).result()
    except GreenoptError:
        raise
    except BrokenProcessPool:
        raise MeterError("an A/A comparison's worker process died (out of memory?); "
                         "nothing was stored; free memory or pass a smaller --protocol") from None


def _quiet_worker() -> None:
    """A worker prints nothing of its libraries' own: no load bars, no deprecation chatter."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for noisy in ("torch", "torch.utils._pytree", "torchao", "transformers", "accelerate", "bitsandbytes", "hqq"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress("A/A comparisons", done, total)
