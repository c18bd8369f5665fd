"""CPU energy from Intel/AMD RAPL counters in the Linux powercap tree (tier M1).

Reads the package domains (top-level zones ``intel-rapl:N`` / ``amd-rapl:N`` whose ``name`` is
``package-N``) and, when present, their ``dram`` subzones. Each ``energy_uj`` counter wraps at
``max_energy_range_uj``; a window's delta adds that range back once when the end value is
below the start. Since the PLATYPUS fix (CVE-2020-8694) ``energy_uj`` is readable by root only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from greenopt.errors import MeterError
from greenopt.measure.base import Meter
from greenopt.records import DeviceInfo, WindowResult

log = logging.getLogger(__name__)

_TOP = re.compile(r"^(intel|amd)-rapl:\d+$")
_SUB = re.compile(r"^(intel|amd)-rapl:\d+:\d+$")


@dataclass(frozen=True)
class _Domain:
    name: str  # "package-0", "dram"
    energy_path: Path
    max_range_uj: int | None


class RaplMeter(Meter):
    """CPU package (+ DRAM) energy from RAPL ``energy_uj`` counters, summed over sockets.

    Args:
        root: the powercap folder (tests pass a fake tree).

    Raises:
        MeterError: no package domain under ``root``, or a counter is unreadable (the
            message names the file and the fix).

    Example:
        >>> meter = RaplMeter()                      # doctest: +SKIP
        >>> with meter.window() as w:                # doctest: +SKIP
        ...     model.generate(ids, max_new_tokens=32)
        >>> w.result.energy_j                        # doctest: +SKIP
        12.3
    """

    name = "rapl"
    tier = "M1"
    min_window_s = 0.01  # counters update about every 1 ms

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self.root = Path(root)
        self.notes: tuple[str, ...] = ()
        self.domains = _discover(self.root)
        self._read_all()  # fail now, with the fix, rather than inside a measurement

    @property
    def has_dram(self) -> bool:
        """True when at least one DRAM domain is counted."""
        return any(d.name == "dram" for d in self.domains)

    def device(self) -> DeviceInfo:
        """CPU model and boundary: package + DRAM, or package only when no DRAM domain exists."""
        boundary = "CPU package + DRAM (RAPL)" if self.has_dram else "CPU package (RAPL, no DRAM domain)"
        return DeviceInfo(kind="cpu", name=cpu_model_name(), meter=self.name, boundary=boundary,
                          notes=self.notes + tuple(f"domain {d.name}: {d.energy_path.parent.name}"
                                                   for d in self.domains))

    def _start(self) -> object:
        return self._read_all()

    def _stop(self, token: object, duration_s: float) -> WindowResult:
        end = self._read_all()
        total_uj = sum(_delta_uj(s, e, d.max_range_uj)
                       for d, s, e in zip(self.domains, token, end))  # type: ignore[call-overload]
        return WindowResult(energy_j=total_uj / 1e6, duration_s=duration_s, tier="M1")

    def _read_all(self) -> list[int]:
        return [_read_counter(d.energy_path) for d in self.domains]


def _discover(root: Path) -> tuple[_Domain, ...]:
    if not root.is_dir():
        raise MeterError(f"no RAPL powercap tree at {root}; this CPU or kernel exposes no RAPL "
                         "(load the intel_rapl_msr module) or choose --meter estimate")
    domains: list[_Domain] = []
    for zone in sorted(p for p in root.iterdir() if _TOP.match(p.name)):
        name = _read_name(zone)
        if not name.startswith("package"):
            continue  # psys overlaps the package domains
        domains.append(_domain(zone, name))
        for sub in sorted(p for p in zone.iterdir() if _SUB.match(p.name)):
            if _read_name(sub) == "dram":
                domains.append(_domain(sub, "dram"))
    if not domains:
        raise MeterError(f"no RAPL package domain under {root}; choose --meter estimate")
    return tuple(domains)


def _domain(zone: Path, name: str) -> _Domain:
    rng = zone / "max_energy_range_uj"
    try:
        max_range = _read_counter(rng) if rng.exists() else None
    except MeterError:
        max_range = None
    if max_range is None:
        log.warning("%s has no readable max_energy_range_uj; a counter wrap would be missed", zone)
    return _Domain(name=name, energy_path=zone / "energy_uj", max_range_uj=max_range)


def _read_name(zone: Path) -> str:
    try:
        with open(zone / "name") as f:
            return f.read().strip()
    except OSError:
        return ""


def _read_counter(path: Path) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except PermissionError:
        root = next(p for p in path.parents if not (_TOP.match(p.name) or _SUB.match(p.name)))
        raise MeterError(f"cannot read {path} (root-only since the PLATYPUS fix); run "
                         f"`sudo chmod a+r {root}/*rapl*/energy_uj` or run greenopt as root") from None
    except (OSError, ValueError) as e:
        raise MeterError(f"cannot read RAPL counter {path}: {e}") from None


def _delta_uj(start: int, end: int, max_range_uj: int | None) -> int:
    if end >= start:
        return end - start
    if max_range_uj is None:
        raise MeterError("RAPL counter wrapped and its max_energy_range_uj is unknown; "
                         "measure again with a shorter window")
    return end + max_range_uj - start


def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU model from ``/proc/cpuinfo`` (``model name``), or the platform's processor name.

    Args:
        cpuinfo: path of the cpuinfo file.

    Returns:
        The model name, e.g. ``"AMD EPYC 7763 64-Core Processor"``.
    """
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"
