"""The meter interface: a context-manager window around the work being measured.

    with meter.window() as w:
        model.generate(...)
    w.result.energy_j, w.result.duration_s, w.result.tier
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Iterator

from greenopt.records import DeviceInfo, Tier, WindowResult


class Window:
    """Filled in when the ``with`` block exits; ``result`` is None until then."""

    def __init__(self) -> None:
        self.result: WindowResult | None = None


class Meter(abc.ABC):
    """An energy source. Subclasses implement ``_start``/``_stop``; ``window`` is shared."""

    name: str = "meter"
    tier: Tier = "E1"
    min_window_s: float = 0.0  # windows shorter than this (s) are flagged "short-window"
    notes: tuple[str, ...] = ()  # facts for DeviceInfo.notes (e.g. why this meter was chosen)

    @abc.abstractmethod
    def device(self) -> DeviceInfo:
        """Facts about the measured device and the measurement boundary."""

    @abc.abstractmethod
    def _start(self) -> object:
        """Reads the start state (e.g. counter value); returned token goes to ``_stop``."""

    @abc.abstractmethod
    def _stop(self, token: object, duration_s: float) -> WindowResult:
        """Reads the end state and returns the window's energy."""

    def sync(self) -> None:
        """Waits for queued device work (``torch.cuda.synchronize`` on GPUs)."""

    def check_model(self, model) -> None:
        """Raises MeterError when this meter cannot measure ``model`` where it sits.

        The default accepts any model; the NVML meter requires it wholly on its one GPU.
        """

    @contextlib.contextmanager
    def window(self) -> Iterator[Window]:
        """Measures the energy of the enclosed block."""
        w = Window()
        self.sync()
        token = self._start()
        t0 = time.perf_counter()
        try:
            yield w
        finally:
            self.sync()
            duration_s = time.perf_counter() - t0
            res = self._stop(token, duration_s)
            if duration_s < self.min_window_s and "short-window" not in res.flags:
                res = res.model_copy(update={"flags": res.flags + ("short-window",)})
            w.result = res
