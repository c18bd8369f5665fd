"""NVIDIA GPU energy through NVML: the board energy counter (M1), else sampled power (M2).

``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded, Volta and newer) is read
after ``torch.cuda.synchronize()`` at both ends of a window. GPUs without that counter fall
back to a background thread sampling ``nvmlDeviceGetPowerUsage`` (mW) and integrating with the
trapezoid rule; such figures are tier M2 and the meter is named ``nvml-sampled``.

``pynvml`` (package ``nvidia-ml-py``) is imported when a meter is built, so machines without
NVIDIA libraries can import greenopt.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

from greenopt.errors import MeterError
from greenopt.measure.base import Meter
from greenopt.records import DeviceInfo, WindowResult

log = logging.getLogger(__name__)

_COUNTER_BOUNDARY = "GPU board (NVML)"


class NvmlMeter(Meter):
    """GPU board energy from NVML.

    Tier M1 from the energy counter; when the GPU does not support it, tier M2 from power
    samples at ``sample_hz``. Windows shorter than 1 s are flagged ``short-window`` (the
    counter updates about every 100 ms).

    Args:
        device_index: the CUDA device index as torch numbers it (mapped to NVML by PCI bus
            id when torch knows it, so ``CUDA_VISIBLE_DEVICES`` is respected).
        sample_hz: power sampling rate for the M2 fallback, in Hz (at least 10).

    Raises:
        MeterError: ``pynvml`` is missing, NVML cannot start (no driver), or the device
            cannot be opened.

    Example:
        >>> meter = NvmlMeter()                      # doctest: +SKIP
        >>> with meter.window() as w:                # doctest: +SKIP
        ...     model.generate(ids, max_new_tokens=64)
        >>> w.result.energy_j, w.result.tier         # doctest: +SKIP
        (41.7, 'M1')
    """

    min_window_s = 1.0

    def __init__(self, device_index: int = 0, sample_hz: float = 20.0) -> None:
        if sample_hz < 10:
            raise MeterError(f"NVML sample_hz must be >= 10 Hz (GO-1 tier M2), got {sample_hz}")
        self.device_index = device_index
        self.sample_hz = float(sample_hz)
        self.notes: tuple[str, ...] = ()
        self._nvml = _import_pynvml()
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as e:
            raise MeterError(f"NVML unavailable: {e}; install the NVIDIA driver or choose "
                             "--meter rapl/estimate") from None
        self._handle = self._open_handle(device_index)
        self.name, self.tier = "nvml", "M1"
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError_NotSupported:
            self.name, self.tier = "nvml-sampled", "M2"
            log.warning("GPU %d has no NVML energy counter; sampling power at %.0f Hz (tier M2)",
                        device_index, self.sample_hz)
        except self._nvml.NVMLError as e:
            raise MeterError(f"NVML energy counter unreadable on GPU {device_index}: {e}") from None

    def _open_handle(self, device_index: int):
        nv = self._nvml
        bus_id = _torch_pci_bus_id(device_index)
        if bus_id is not None:
            try:
                return nv.nvmlDeviceGetHandleByPciBusId(bus_id)
            except nv.NVMLError:
                log.debug("no NVML handle for PCI bus id %s; using index %d", bus_id, device_index)
        try:
            return nv.nvmlDeviceGetHandleByIndex(device_index)
        except nv.NVMLError as e:
            raise MeterError(f"NVML cannot open GPU {device_index}: {e}; check the device index") from None

    # ------------------------------------------------------------------ Meter interface

    def device(self) -> DeviceInfo:
        """Name, driver version, enforced power limit (W) and boundary of the measured GPU."""
        nv = self._nvml
        boundary = _COUNTER_BOUNDARY if self.tier == "M1" else \
            f"GPU board (NVML power samples at {self.sample_hz:.0f} Hz)"
        try:
            limit_w: float | None = nv.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1000.0
        except nv.NVMLError:
            limit_w = None
        return DeviceInfo(kind="cuda", name=_text(nv.nvmlDeviceGetName(self._handle)), meter=self.name,
                          boundary=boundary, driver=_text(nv.nvmlSystemGetDriverVersion()),
                          power_limit_w=limit_w, notes=self.notes)

    def sync(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(self.device_index)

    def _start(self) -> object:
        if self.tier == "M1":
            return self._counter_mj()
        sampler = _PowerSampler(lambda: self._nvml.nvmlDeviceGetPowerUsage(self._handle), self.sample_hz)
        sampler.start()
        return sampler

    def _stop(self, token: object, duration_s: float) -> WindowResult:
        if self.tier == "M2":
            assert isinstance(token, _PowerSampler)
            samples = token.stop()
            return WindowResult(energy_j=trapezoid_energy_j(samples), duration_s=duration_s, tier="M2")
        end_mj = self._counter_mj()
        delta_mj = end_mj - int(token)  # type: ignore[call-overload]
        if delta_mj < 0:
            log.warning("NVML energy counter went backwards (%d -> %d mJ)", token, end_mj)
            return WindowResult(energy_j=0.0, duration_s=duration_s, tier="M1",
                                flags=("counter-not-monotonic",))
        return WindowResult(energy_j=delta_mj / 1000.0, duration_s=duration_s, tier="M1")

    def _counter_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    # ------------------------------------------------------------------ validity

    def foreign_gpu_processes(self) -> tuple[int, ...]:
        """PIDs of compute processes on this GPU other than this one.

        Inside a container NVML reports host PIDs, so this process's PID may not appear;
        then, if this process holds a CUDA context, one listed process is taken to be ours
        and the rest are reported (the count is what the validity check uses).

        Returns:
            The foreign PIDs, sorted; empty when the GPU is ours alone.
        """
        nv = self._nvml
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except nv.NVMLError as e:
            log.warning("cannot list GPU processes (%s); foreign-process check skipped", e)
            return ()
        pids = sorted({int(p.pid) for p in procs})
        own = os.getpid()
        if own in pids:
            return tuple(p for p in pids if p != own)
        if pids and _holds_cuda_context():
            return tuple(pids[1:])
        return tuple(pids)


def foreign_gpu_processes(device_index: int = 0) -> tuple[int, ...]:
    """PIDs of compute processes on CUDA device ``device_index`` other than this one.

    Args:
        device_index: the CUDA device index as torch numbers it.

    Returns:
        The foreign PIDs, sorted (see ``NvmlMeter.foreign_gpu_processes``).

    Raises:
        MeterError: NVML is unavailable.
    """
    return NvmlMeter(device_index).foreign_gpu_processes()


def trapezoid_energy_j(samples: Sequence[tuple[float, float]]) -> float:
    """Energy in J from ``(time_s, power_w)`` samples by the trapezoid rule.

    Args:
        samples: time-ordered samples; fewer than two give 0.0.

    Returns:
        The integral of power over the sampled span, in J.
    """
    return float(sum((t1 - t0) * (p0 + p1) / 2.0
                     for (t0, p0), (t1, p1) in zip(samples, samples[1:])))


class _PowerSampler:
    """Samples ``read_mw()`` at ``hz`` on a daemon thread, plus once at start and at stop."""

    def __init__(self, read_mw, hz: float) -> None:
        self._read_mw, self._period_s = read_mw, 1.0 / hz
        self._samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvml-power-sampler", daemon=True)

    def _take(self) -> None:
        self._samples.append((time.perf_counter(), self._read_mw() / 1000.0))

    def _loop(self) -> None:
        while not self._done.wait(self._period_s):
            self._take()

    def start(self) -> None:
        self._take()
        self._thread.start()

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self._thread.join()
        self._take()
        return sorted(self._samples)


def _import_pynvml():
    try:
        import pynvml
    except ImportError:
        raise MeterError("pynvml is not installed; pip install nvidia-ml-py") from None
    return pynvml


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _torch_pci_bus_id(device_index: int) -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(device_index)
        domain, bus, dev = props.pci_domain_id, props.pci_bus_id, props.pci_device_id
    except (AttributeError, RuntimeError, AssertionError):
        return None
    return f"{domain:08x}:{bus:02x}:{dev:02x}.0"


def _holds_cuda_context() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_initialized()
    except RuntimeError:
        return False
