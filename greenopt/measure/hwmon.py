"""AMD CPU energy from hwmon energy sensors (tier M1), for machines without the RAPL powercap tree.

The ``amd_energy`` driver (mainline Linux 5.8-5.12, out of tree since) and its fork
``zenergy`` expose AMD's RAPL energy MSRs under ``/sys/class/hwmon/hwmonN/`` (``name`` is the
driver): ``energyN_input`` in µJ, labelled by ``energyN_label`` ``Esocket<S>`` (the package,
cores included) or ``Ecore<CCC>`` (one core). The drivers accumulate the 32-bit MSRs into
64-bit counters, so the values do not wrap in practice; a counter that goes backwards flags
the window ``counter-not-monotonic``.

The meter sums the socket counters; when a driver exposes only core counters it sums those,
and the boundary says the uncore is missing. DRAM is not covered by either driver.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from greenopt.errors import MeterError
from greenopt.measure.base import Meter
from greenopt.measure.rapl import cpu_model_name
from greenopt.records import DeviceInfo, WindowResult

log = logging.getLogger(__name__)

DRIVERS = ("amd_energy", "zenergy")
"""hwmon drivers whose energy sensors are read, in order of preference (one driver is used)."""

_INPUT = re.compile(r"^energy(\d+)_input$")


@dataclass(frozen=True)
class _Sensor:
    label: str  # "Esocket0", "Ecore003"
    path: Path


class HwmonMeter(Meter):
    """CPU energy from the ``amd_energy``/``zenergy`` hwmon sensors, summed over sockets.

    Args:
        root: the hwmon class folder (tests pass a fake tree).
        cpuinfo: the cpuinfo file giving the CPU's name.

    Raises:
        MeterError: no supported driver under ``root``, it has no energy sensors, or a
            sensor is unreadable (the message names the file and the fix).

    Example:
        >>> meter = HwmonMeter()                     # doctest: +SKIP
        >>> with meter.window() as w:                # doctest: +SKIP
        ...     model.generate(ids, max_new_tokens=32)
        >>> w.result.energy_j, meter.driver          # doctest: +SKIP
        (9.8, 'amd_energy')
    """

    name = "hwmon"
    tier = "M1"
    min_window_s = 0.01  # the drivers read the MSRs (updated about every 1 ms) on each read

    def __init__(self, root: str | Path = "/sys/class/hwmon", cpuinfo: str | Path = "/proc/cpuinfo") -> None:
        self.root = Path(root)
        self.cpuinfo = cpuinfo
        self.notes: tuple[str, ...] = ()
        self.driver, self.sensors = _discover(self.root)
        self.sockets = any(s.label.lower().startswith("esocket") for s in self.sensors)
        self._read_all()  # fail now, with the fix, rather than inside a measurement

    def device(self) -> DeviceInfo:
        """CPU model and boundary: CPU packages (socket counters), or cores only."""
        what = "CPU package" if self.sockets else "CPU cores only (no socket counter; uncore missing)"
        return DeviceInfo(kind="cpu", name=cpu_model_name(self.cpuinfo), meter=self.name,
                          boundary=f"{what} (hwmon {self.driver}, no DRAM)",
                          notes=self.notes + (f"sensors: {', '.join(s.label for s in self.sensors)}",))

    def _start(self) -> object:
        return self._read_all()

    def _stop(self, token: object, duration_s: float) -> WindowResult:
        end = self._read_all()
        total_uj, flags = 0, ()
        for sensor, s, e in zip(self.sensors, token, end):  # type: ignore[call-overload]
            if e < s:
                log.warning("hwmon counter %s went backwards (%d -> %d uJ)", sensor.path, s, e)
                flags = ("counter-not-monotonic",)
                continue
            total_uj += e - s
        return WindowResult(energy_j=total_uj / 1e6, duration_s=duration_s, tier="M1", flags=flags)

    def _read_all(self) -> list[int]:
        return [_read_uj(s.path) for s in self.sensors]


def _discover(root: Path) -> tuple[str, tuple[_Sensor, ...]]:
    if not root.is_dir():
        raise MeterError(f"no hwmon tree at {root}; no amd_energy/zenergy sensors to read")
    found: dict[str, list[Path]] = {}
    for dev in sorted(root.iterdir()):
        driver = _driver_name(dev)
        if driver in DRIVERS:
            found.setdefault(driver, []).append(dev)
    if not found:
        raise MeterError(f"no {' or '.join(DRIVERS)} hwmon driver under {root}; on AMD CPUs load one "
                         "(modprobe amd_energy, or install zenergy) or choose --meter estimate")
    driver = next(d for d in DRIVERS if d in found)
    sensors: dict[str, _Sensor] = {}
    for dev in found[driver]:
        for f in sorted(dev.iterdir(), key=lambda p: _index(p.name)):
            m = _INPUT.match(f.name)
            if m:
                label = _read_text(dev / f"energy{m.group(1)}_label") or f"{dev.name}/energy{m.group(1)}"
                sensors.setdefault(label, _Sensor(label, f))  # one driver instance per counter
    sockets = [s for s in sensors.values() if s.label.lower().startswith("esocket")]
    chosen = sockets or list(sensors.values())
    if not chosen:
        raise MeterError(f"the {driver} hwmon driver under {root} exposes no energy*_input sensors")
    return driver, tuple(chosen)


def _driver_name(dev: Path) -> str:
    return _read_text(dev / "name") or _read_text(dev / "device" / "name")


def _index(name: str) -> int:
    m = _INPUT.match(name)
    return int(m.group(1)) if m else -1


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_uj(path: Path) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except PermissionError:
        raise MeterError(f"cannot read {path} (root-only, like RAPL since the PLATYPUS fix); run "
                         f"`sudo chmod a+r {path.parent}/energy*_input` or run greenopt as root") from None
    except (OSError, ValueError) as e:
        raise MeterError(f"cannot read hwmon energy sensor {path}: {e}") from None
