"""Choosing a meter: NVML for CUDA work, RAPL for CPU work, else the marked estimate.

    >>> meter = select_meter("auto", device="cpu")   # RAPL when readable, else estimate
    >>> meter.tier in ("M1", "E1")
    True
"""

from __future__ import annotations

import logging

from greenopt.env import parse_device
from greenopt.errors import MeterError
from greenopt.measure.base import Meter
from greenopt.measure.estimate import EstimateMeter
from greenopt.measure.nvml import NvmlMeter
from greenopt.measure.rapl import RaplMeter
from greenopt.records import Record, Tier

log = logging.getLogger(__name__)

METER_NAMES = ("auto", "nvml", "rapl", "estimate")
_NOMINAL_TIER: dict[str, Tier] = {"nvml": "M1", "rapl": "M1", "estimate": "E1"}


class MeterStatus(Record):
    """Whether a meter works on this machine, its tier, and why (not)."""

    name: str
    available: bool
    tier: Tier
    reason: str


def select_meter(name: str = "auto", *, cpu_watts: float | None = None, device: str = "auto") -> Meter:
    """Builds the named meter, or the best available one for ``name="auto"``.

    ``auto``: NVML when the work runs on CUDA and NVML works (counter M1, or sampled power
    M2 on GPUs without the counter); otherwise RAPL when its counters are readable;
    otherwise the CPU-time estimate (E1). A CUDA run that falls back to a CPU meter says so
    in the device notes, since that figure no longer covers the GPU.

    Args:
        name: ``auto``, ``nvml``, ``rapl`` or ``estimate``.
        cpu_watts: W per busy core for the estimate (``--cpu-watts``); None = default.
        device: where the model runs: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or
            ``cuda:N``.

    Returns:
        A ready meter.

    Raises:
        MeterError: an explicitly named meter is unavailable (the message says why), or the
            name is unknown.
    """
    if name not in METER_NAMES:
        raise MeterError(f"unknown meter {name!r}; choose one of {', '.join(METER_NAMES)}")
    kind, index = parse_device(device)
    if name == "nvml":
        return NvmlMeter(index)
    if name == "rapl":
        return RaplMeter()
    if name == "estimate":
        return EstimateMeter(cpu_watts)
    gpu_reason = ""
    if kind == "cuda":
        try:
            return NvmlMeter(index)
        except MeterError as e:
            gpu_reason = str(e)
            log.warning("model runs on CUDA but %s; measuring the CPU side only", gpu_reason)
    meter: Meter
    try:
        meter = RaplMeter()
    except MeterError as e:
        log.info("RAPL unavailable (%s); using the CPU-time estimate (tier E1)", e)
        meter = EstimateMeter(cpu_watts)
    if gpu_reason:
        meter.notes = meter.notes + (f"model ran on CUDA but {gpu_reason}; GPU energy not included",)  # type: ignore[attr-defined]
    return meter


def meter_report(*, cpu_watts: float | None = None, device: str = "auto") -> tuple[MeterStatus, ...]:
    """Which meters work here and why the others do not (for ``greenopt env``).

    Args:
        cpu_watts: W per busy core for the estimate's description.
        device: as in ``select_meter``; picks the GPU NVML is asked about.

    Returns:
        One status each for ``nvml``, ``rapl`` and ``estimate``, in that order.
    """
    _, index = parse_device(device)
    out = []
    for name in ("nvml", "rapl", "estimate"):
        try:
            meter = select_meter(name, cpu_watts=cpu_watts, device=f"cuda:{index}" if name == "nvml" else "cpu")
            info = meter.device()
            out.append(MeterStatus(name=name, available=True, tier=meter.tier,
                                   reason=f"{info.name}: {info.boundary}"))
        except MeterError as e:
            out.append(MeterStatus(name=name, available=False, tier=_NOMINAL_TIER[name], reason=str(e)))
    return tuple(out)
