"""Choosing a meter: NVML for CUDA work, a CPU energy counter for CPU work, else the marked estimate.

CPU energy counters, tried in this order (all tier M1): RAPL in the powercap tree
(:class:`RaplMeter`), RAPL through the zeusd daemon when the tree is not readable
(:class:`ZeusdRaplMeter`), AMD's ``amd_energy``/``zenergy`` hwmon sensors (:class:`HwmonMeter`).

    >>> meter = select_meter("auto", device="cpu")   # a CPU counter when readable, else estimate
    >>> meter.tier in ("M1", "E1")
    True
"""

from __future__ import annotations

import logging

from greenopt.env import parse_device
from greenopt.errors import MeterError
from greenopt.measure.base import Meter
from greenopt.measure.estimate import EstimateMeter
from greenopt.measure.hwmon import HwmonMeter
from greenopt.measure.nvml import NvmlMeter
from greenopt.measure.rapl import RaplMeter, ZeusdRaplMeter
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


def cpu_counter_meter() -> Meter:
    """The first readable CPU energy counter: RAPL (powercap), RAPL via zeusd, hwmon amd_energy/zenergy.

    Returns:
        A ready tier-M1 meter.

    Raises:
        MeterError: none is readable; the one-line message gives each source's reason.
    """
    reasons = []
    for label, factory in (("RAPL", RaplMeter), ("zeusd", ZeusdRaplMeter), ("hwmon", HwmonMeter)):
        try:
            meter = factory()
        except MeterError as e:
            reasons.append(f"{label}: {e}")
            continue
        if reasons:
            meter.notes = meter.notes + (f"chosen because {'; '.join(reasons)}",)
        return meter
    raise MeterError("no readable CPU energy counter (" + " | ".join(reasons) + ")")


def select_meter(name: str = "auto", *, cpu_watts: float | None = None, device: str = "auto") -> Meter:
    """Builds the named meter, or the best available one for ``name="auto"``.

    ``auto``: NVML when the work runs on CUDA and NVML works (counter M1, or sampled power
    M2 on GPUs without the counter); otherwise a CPU energy counter
    (:func:`cpu_counter_meter`: RAPL, RAPL via zeusd, hwmon); otherwise the CPU-time
    estimate (E1). A CUDA run that falls back to a CPU meter says so in the device notes,
    since that figure no longer covers the GPU.

    Args:
        name: ``auto``, ``nvml``, ``rapl`` (any CPU energy counter, as in ``auto``) or
            ``estimate``.
        cpu_watts: W per busy core for the estimate (``--cpu-watts``); None = from the CPU
            TDP table, else 10 W.
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
        return cpu_counter_meter()
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
        meter = cpu_counter_meter()
    except MeterError as e:
        log.info("%s; using the CPU-time estimate (tier E1)", e)
        meter = EstimateMeter(cpu_watts)
    if gpu_reason:
        meter.notes = meter.notes + (f"model ran on CUDA but {gpu_reason}; GPU energy not included",)
    return meter


def meter_report(*, cpu_watts: float | None = None, device: str = "auto") -> tuple[MeterStatus, ...]:
    """Which meters work here and why the others do not (for ``greenopt env``).

    Args:
        cpu_watts: W per busy core for the estimate's description.
        device: as in ``select_meter``; picks the GPU NVML is asked about.

    Returns:
        One status each for ``nvml``, ``rapl`` (the CPU counter chosen, its meter name in the
        reason) and ``estimate``, in that order.
    """
    _, index = parse_device(device)
    out = []
    for name in ("nvml", "rapl", "estimate"):
        try:
            meter = select_meter(name, cpu_watts=cpu_watts, device=f"cuda:{index}" if name == "nvml" else "cpu")
            info = meter.device()
            source = f" [{meter.name}]" if meter.name != name else ""
            out.append(MeterStatus(name=name, available=True, tier=meter.tier,
                                   reason=f"{info.name}: {info.boundary}{source}"))
        except MeterError as e:
            out.append(MeterStatus(name=name, available=False, tier=_NOMINAL_TIER[name], reason=str(e)))
    return tuple(out)
