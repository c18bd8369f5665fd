"""NVIDIA GPU energy through NVML: the board energy counter (M1), else sampled power (M2).

``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded, Volta and newer) is read
after ``torch.cuda.synchronize()`` at both ends of a window. GPUs without that counter fall
back to a background thread sampling ``nvmlDeviceGetPowerUsage`` (mW) and integrating with the
trapezoid rule; such figures are tier M2 and the meter is named ``nvml-sampled``.

Validity (shared/ENERGY.md §2-3), checked by the meter itself so every window says what held:

- the GPU is the one torch computes on: the torch CUDA device is mapped to its NVML handle by
  PCI bus id (so ``CUDA_VISIBLE_DEVICES`` is honoured); a failed lookup is a ``MeterError``;
- the model sits on that one GPU (:func:`model_cuda_device`, :meth:`NvmlMeter.check_model`);
- windows are long enough: the counter's update period (measured by polling at start) is at
  most 1% of ``min_window_s``; shorter windows are flagged ``short-window``;
- no foreign processes: a process listing that cannot run flags the window
  ``gpu-process-check-failed`` rather than passing silently;
- MIG: the counter covers the whole board, every MIG instance included, so each window of a
  GPU in MIG mode is flagged ``mig-whole-gpu`` (the figure keeps its source, drops a tier).

``pynvml`` (package ``nvidia-ml-py``) is imported when a meter is built, so machines without
NVIDIA libraries can import greenopt.
"""

from __future__ import annotations

import itertools
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence

from greenopt.errors import MeterError
from greenopt.measure.base import Meter
from greenopt.records import DeviceInfo, WindowResult

log = logging.getLogger(__name__)

_COUNTER_BOUNDARY = "GPU board (NVML)"

DEFAULT_COUNTER_PERIOD_S = 0.1
"""Assumed update period of NVML's energy counter and power reading, in s, when polling at
start sees too few updates (many boards refresh both about every 100 ms)."""

WINDOW_PERIODS = 100
"""A window spans at least this many counter updates, so one update is <= 1% of it."""

MIN_WINDOW_FLOOR_S = 1.0
"""No NVML window is shorter than this, in s (ENERGY.md §3: windows under about 1 s are flagged)."""

PROBE_S = 0.6  # polling time of the update-period estimate


class NvmlMeter(Meter):
    """GPU board energy from NVML.

    Tier M1 from the energy counter; when the GPU does not support it, tier M2 from power
    samples at ``sample_hz``.

    ``min_window_s`` is ``max(1 s, 100 x counter update period)``: the update period is
    measured by polling the counter for up to 0.6 s when the meter is built (or taken from
    ``counter_period_s``), else assumed to be 100 ms (so 10 s). The workload lengthens its
    trial, idle and prefill windows to it; a shorter window is flagged ``short-window``.

    MIG: with MIG mode on, the energy counter (and power reading) belong to the whole GPU,
    every MIG instance included, and other instances' processes are not visible to this
    one. ENERGY.md says a figure that fails a validity check keeps its source and drops a
    tier, so the meter does not refuse: every window is flagged ``mig-whole-gpu`` (the
    measurement's tier drops one step) and the device notes say the boundary is the whole GPU.

    Args:
        device_index: the CUDA device index as torch numbers it; mapped to the NVML device by
            PCI bus id, so ``CUDA_VISIBLE_DEVICES`` is respected.
        sample_hz: power sampling rate for the M2 fallback, in Hz (at least 10).
        pci_bus_id: the GPU's PCI bus id (``"00000000:3b:00.0"``); None looks it up from torch
            for ``device_index``. Given, the model's device is still checked by ``check_model``.
        counter_period_s: the counter's update period in s; None measures it by polling.

    Raises:
        MeterError: ``pynvml`` is missing, NVML cannot start (no driver), torch sees no such
            CUDA device, or NVML has no GPU at its PCI bus id (never a silent fall back to the
            NVML index, which may name another GPU).

    Example:
        >>> meter = NvmlMeter()                      # doctest: +SKIP
        >>> meter.check_model(model)                 # doctest: +SKIP
        >>> with meter.window() as w:                # doctest: +SKIP
        ...     model.generate(ids, max_new_tokens=64)
        >>> w.result.energy_j, w.result.tier         # doctest: +SKIP
        (41.7, 'M1')
    """

    def __init__(self, device_index: int = 0, sample_hz: float = 20.0, *, pci_bus_id: str | None = None,
                 counter_period_s: float | None = None) -> None:
        if sample_hz < 10:
            raise MeterError(f"NVML sample_hz must be >= 10 Hz (GO-1 tier M2), got {sample_hz}")
        if counter_period_s is not None and not counter_period_s > 0:
            raise MeterError(f"NVML counter_period_s must be a positive number of s, got {counter_period_s}")
        self.device_index = device_index
        self.sample_hz = float(sample_hz)
        self.notes: tuple[str, ...] = ()
        self.process_check_failed = False
        self._nvml = _import_pynvml()
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as e:
            raise MeterError(f"NVML unavailable: {e}; install the NVIDIA driver or choose "
                             "--meter rapl/estimate") from None
        self.pci_bus_id = pci_bus_id or _torch_pci_bus_id(device_index)
        self._handle = self._open_handle(self.pci_bus_id)
        self.name, self.tier = "nvml", "M1"
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError_NotSupported:
            self.name, self.tier = "nvml-sampled", "M2"
            log.warning("GPU %d has no NVML energy counter; sampling power at %.0f Hz (tier M2)",
                        device_index, self.sample_hz)
        except self._nvml.NVMLError as e:
            raise MeterError(f"NVML energy counter unreadable on GPU {device_index}: {e}") from None
        self.mig = self._mig_enabled()
        self.counter_period_s, how = self._update_period(counter_period_s)
        self.min_window_s = max(MIN_WINDOW_FLOOR_S, WINDOW_PERIODS * self.counter_period_s)
        self.notes += (f"NVML {'counter' if self.tier == 'M1' else 'power'} update period "
                       f"{self.counter_period_s * 1000:.0f} ms ({how}); windows >= {self.min_window_s:.1f} s",)
        if self.mig:
            self.notes += ("MIG mode on: the NVML figure covers the whole GPU, every MIG instance included",)

    def _open_handle(self, bus_id: str):
        nv = self._nvml
        try:
            return nv.nvmlDeviceGetHandleByPciBusId(bus_id)
        except nv.NVMLError as e:
            raise MeterError(f"NVML has no GPU at PCI bus id {bus_id} (torch cuda:{self.device_index}"
                             f"{_visible_devices()}): {e}; NVML and CUDA must see the same GPUs") from None

    def _mig_enabled(self) -> bool:
        nv = self._nvml
        try:
            current, _pending = nv.nvmlDeviceGetMigMode(self._handle)
        except nv.NVMLError_NotSupported:
            return False  # pre-Ampere and consumer GPUs have no MIG
        except (nv.NVMLError, AttributeError) as e:
            log.warning("cannot read MIG mode of GPU %d (%s); assuming MIG is off", self.device_index, e)
            self.notes += (f"MIG mode unreadable ({e}); assumed off",)
            return False
        return int(current) == int(getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1))

    def _update_period(self, given_s: float | None) -> tuple[float, str]:
        if given_s is not None:
            return float(given_s), "given"
        if self.tier == "M2":
            return max(DEFAULT_COUNTER_PERIOD_S, 1.0 / self.sample_hz), "assumed"
        period_s = estimate_update_period_s(self._counter_mj)
        if period_s is None:
            log.info("NVML counter of GPU %d did not update often enough in %.1f s; assuming %.0f ms",
                     self.device_index, PROBE_S, DEFAULT_COUNTER_PERIOD_S * 1000)
            return DEFAULT_COUNTER_PERIOD_S, "assumed; too few updates seen"
        return period_s, "measured"

    # ------------------------------------------------------------------ Meter interface

    def device(self) -> DeviceInfo:
        """Name, driver version, enforced power limit (W) and boundary of the measured GPU."""
        nv = self._nvml
        boundary = _COUNTER_BOUNDARY if self.tier == "M1" else \
            f"GPU board (NVML power samples at {self.sample_hz:.0f} Hz)"
        if self.mig:
            boundary += ", whole GPU (MIG instances share it)"
        try:
            limit_w: float | None = nv.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1000.0
        except nv.NVMLError:
            limit_w = None
        return DeviceInfo(kind="cuda", name=_text(nv.nvmlDeviceGetName(self._handle)), meter=self.name,
                          boundary=boundary, driver=_text(nv.nvmlSystemGetDriverVersion()),
                          power_limit_w=limit_w, notes=self.notes)

    def check_model(self, model) -> None:
        """Raises MeterError unless every parameter and buffer of ``model`` is on this meter's GPU.

        Args:
            model: a torch module.

        Raises:
            MeterError: the model is on the CPU, split over devices, offloaded (``meta``), or
                on another GPU than the one metered.
        """
        index = model_cuda_device(model)
        if index != self.device_index:
            raise MeterError(f"the model is on cuda:{index} but the NVML meter measures cuda:{self.device_index}; "
                             f"pass device='cuda:{index}' to the meter")

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
            res = WindowResult(energy_j=trapezoid_energy_j(samples), duration_s=duration_s, tier="M2")
        else:
            end_mj = self._counter_mj()
            delta_mj = end_mj - int(token)  # type: ignore[call-overload]
            if delta_mj < 0:
                log.warning("NVML energy counter went backwards (%d -> %d mJ)", token, end_mj)
                res = WindowResult(energy_j=0.0, duration_s=duration_s, tier="M1",
                                   flags=("counter-not-monotonic",))
            else:
                res = WindowResult(energy_j=delta_mj / 1000.0, duration_s=duration_s, tier="M1")
        flags = self._window_flags()
        return res.model_copy(update={"flags": res.flags + flags}) if flags else res

    def _window_flags(self) -> tuple[str, ...]:
        flags = ("mig-whole-gpu",) if self.mig else ()
        if self._list_processes() is None:
            flags += ("gpu-process-check-failed",)
        return flags

    def _counter_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    # ------------------------------------------------------------------ validity

    def _list_processes(self) -> tuple[int, ...] | None:
        nv = self._nvml
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except nv.NVMLError as e:
            if not self.process_check_failed:
                log.warning("cannot list GPU processes (%s); measurements are flagged gpu-process-check-failed", e)
            self.process_check_failed = True
            return None
        return tuple(sorted({int(p.pid) for p in procs}))

    def foreign_gpu_processes(self) -> tuple[int, ...]:
        """PIDs of compute processes on this GPU other than this one.

        Inside a container NVML reports host PIDs, so this process's PID may not appear;
        then, if this process holds a CUDA context, one listed process is taken to be ours
        and the rest are reported (the count is what the validity check uses).

        When NVML cannot list the processes, this returns ``()``, sets
        ``process_check_failed`` and every window this meter closes is flagged
        ``gpu-process-check-failed``: the check could not run, which is not a pass.

        Returns:
            The foreign PIDs, sorted; empty when the GPU is ours alone or the listing failed.
        """
        pids = self._list_processes()
        if not pids:
            return ()
        own = os.getpid()
        if own in pids:
            return tuple(p for p in pids if p != own)
        if _holds_cuda_context():
            return pids[1:]
        return pids


def foreign_gpu_processes(device_index: int = 0) -> tuple[int, ...]:
    """PIDs of compute processes on CUDA device ``device_index`` other than this one.

    Args:
        device_index: the CUDA device index as torch numbers it.

    Returns:
        The foreign PIDs, sorted (see ``NvmlMeter.foreign_gpu_processes``).

    Raises:
        MeterError: NVML is unavailable, or the device cannot be mapped to NVML.
    """
    return NvmlMeter(device_index, counter_period_s=DEFAULT_COUNTER_PERIOD_S).foreign_gpu_processes()


def model_cuda_device(model) -> int:
    """The index of the one CUDA device that holds every parameter and buffer of ``model``.

    NVML meters one GPU board; a model split over GPUs, left on the CPU, or offloaded
    (``device_map`` with ``cpu``/``disk`` entries leaves ``meta`` tensors) would be metered
    wrongly, so this refuses it.

    Args:
        model: a torch module.

    Returns:
        The CUDA device index (as torch numbers it).

    Raises:
        MeterError: the model has no tensors, or they are not all on one CUDA device (the
            message names the devices found).
    """
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if not devices:
        raise MeterError("the model has no parameters or buffers; nothing places it on a GPU")
    if len(devices) == 1:
        (dev,) = devices
        if dev.type == "cuda":
            if dev.index is not None:
                return int(dev.index)
            import torch

            return int(torch.cuda.current_device())
    names = ", ".join(sorted(str(d) for d in devices))
    raise MeterError(f"the NVML meter needs the model on one GPU, but its tensors are on {names}; "
                     "load it with device='cuda:N' and no device_map offload")


def estimate_update_period_s(read: Callable[[], int], probe_s: float = PROBE_S, *,
                             clock: Callable[[], float] = time.perf_counter,
                             sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Estimates how often a counter changes by polling it about every 1 ms.

    Args:
        read: returns the counter's current value.
        probe_s: longest polling time, in s; stops early after 5 changes.
        clock: monotonic clock in s (tests pass a fake).
        sleep: sleeps for s seconds (tests pass a fake).

    Returns:
        The median time between observed changes, in s, or None when fewer than 3 changes
        (2 full periods) were seen.
    """
    t_end = clock() + probe_s
    last = read()
    changes: list[float] = []
    while len(changes) < 5:
        now = clock()
        if now >= t_end:
            break
        value = read()
        if value != last:
            changes.append(now)
            last = value
        sleep(0.001)
    if len(changes) < 3:
        return None
    return float(statistics.median(b - a for a, b in zip(changes, changes[1:])))


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


def _visible_devices() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible}"


def _torch_pci_bus_id(device_index: int) -> str:
    """The PCI bus id of torch's ``cuda:device_index`` in NVML's format; MeterError when unknown."""
    import torch

    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except RuntimeError:
        count = 0
    if count == 0:
        raise MeterError(f"NVML meters CUDA work but torch sees no CUDA device (torch {torch.__version__}"
                         f"{_visible_devices()}); run the model on a GPU or choose --meter rapl/estimate")
    if not 0 <= device_index < count:
        raise MeterError(f"CUDA device {device_index} does not exist: torch sees {count}{_visible_devices()}; "
                         f"choose cuda:0 to cuda:{count - 1}")
    try:
        props = torch.cuda.get_device_properties(device_index)
        domain, bus, dev = int(props.pci_domain_id), int(props.pci_bus_id), int(props.pci_device_id)
    except (AttributeError, RuntimeError, AssertionError, TypeError) as e:
        raise MeterError(f"cannot read the PCI bus id of cuda:{device_index} from torch ({e}); "
                         "pass pci_bus_id= to NvmlMeter") from None
    return f"{domain:08x}:{bus:02x}:{dev:02x}.0"


def _holds_cuda_context() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_initialized()
    except RuntimeError:
        return False
