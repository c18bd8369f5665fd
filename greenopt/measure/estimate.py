"""A model-based CPU energy estimate (tier E1) for machines without a readable counter.

energy_j = CPU time used by this process (all threads) x watts per busy core.

This is not a measurement: figures from it carry tier E1, are shown as ``~B (estimated)``
and never receive an absolute letter. Ratios between two variants measured with it are
ratios of CPU time, which tracks energy only as far as power per busy core is constant.
"""

from __future__ import annotations

import time
from pathlib import Path

import greenopt.measure.tdp as tdp
from greenopt.errors import ConfigError
from greenopt.measure.base import Meter
from greenopt.measure.rapl import cpu_model_name
from greenopt.records import DeviceInfo, WindowResult

DEFAULT_CPU_WATTS_PER_CORE = 10.0
"""Power of one busy core, in W, when the CPU TDP table has no row for this CPU.

CodeCarbon-style reasoning: power = TDP / cores x busy cores. CodeCarbon falls back to a
TDP of 85 W when the CPU is unknown; on a typical 8-core part that is about 10.6 W per core.
Published TDP/cores for current chips spans roughly 4-12 W (EPYC 7763: 280 W / 64 cores =
4.4 W; Xeon 8380: 270 W / 40 = 6.8 W; desktop Core i7-12700: 125 W / 12 = 10.4 W), so 10 W
is a round, deliberately unflattering figure. When the CPU is in the TDP table
(:mod:`greenopt.measure.tdp`), TDP / cores of that CPU is used instead; ``--cpu-watts`` overrides both.
"""


class EstimateMeter(Meter):
    """Process CPU time x watts per busy core (tier E1, an estimate).

    CPU time is ``time.process_time()``: user + system time of every thread of this process
    (torch's intra-op threads included), so a window on N busy threads for t seconds counts
    N x t core-seconds.

    Watts per busy core: ``cpu_watts_per_core`` when given (``--cpu-watts`` always wins); else
    TDP / cores of this CPU from the TDP table (:func:`greenopt.measure.tdp.cpu_watts_per_core`);
    else ``DEFAULT_CPU_WATTS_PER_CORE`` (10 W). The device notes say which, e.g.
    ``"TDP table: Intel Xeon Gold 6338 205 W / 32 cores = 6.41 W/core (cores from /proc/cpuinfo)"``
    or ``"no TDP row for <model>; default 10 W/core"``.

    Args:
        cpu_watts_per_core: W per busy core; None looks the CPU up in the TDP table.
        cpuinfo: the cpuinfo file naming the CPU (tests pass a fake).

    Raises:
        ConfigError: ``cpu_watts_per_core`` is not positive.

    Example:
        >>> meter = EstimateMeter(cpu_watts_per_core=6.0)
        >>> with meter.window() as w:
        ...     _ = sum(range(10_000))
        >>> w.result.tier
        'E1'
    """

    name = "estimate"
    tier = "E1"
    min_window_s = 0.01

    def __init__(self, cpu_watts_per_core: float | None = None, *, cpuinfo: str | Path = "/proc/cpuinfo") -> None:
        self.cpuinfo = cpuinfo
        if cpu_watts_per_core is None:
            found = tdp.cpu_watts_per_core(cpuinfo, default_w=DEFAULT_CPU_WATTS_PER_CORE)
            watts, source = found.watts_per_core, found.note
        else:
            watts = float(cpu_watts_per_core)
            source = f"--cpu-watts {watts:g} W/core (given)"
        if not watts > 0:
            raise ConfigError(f"--cpu-watts must be a positive number of W per core, got {cpu_watts_per_core}")
        self.cpu_watts_per_core = watts
        self.watts_source = source
        self.notes: tuple[str, ...] = ()

    def device(self) -> DeviceInfo:
        """The CPU model; the boundary states the estimate's formula, the notes where W/core came from."""
        boundary = f"process CPU time x {self.cpu_watts_per_core:.1f} W/core (estimate, not a measurement)"
        return DeviceInfo(kind="cpu", name=cpu_model_name(self.cpuinfo), meter=self.name, boundary=boundary,
                          notes=(self.watts_source,) + self.notes)

    def _start(self) -> object:
        return time.process_time()

    def _stop(self, token: object, duration_s: float) -> WindowResult:
        cpu_s = max(0.0, time.process_time() - float(token))  # type: ignore[arg-type]
        return WindowResult(energy_j=cpu_s * self.cpu_watts_per_core, duration_s=duration_s, tier="E1")
