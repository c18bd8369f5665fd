"""Meters on CPU: NVML with a mocked pynvml, RAPL on a fake sysfs tree, the estimate, selection."""

from __future__ import annotations

import builtins
import functools
import os
import sys
import time
import types
from pathlib import Path

import pytest

from greenopt.errors import ConfigError, MeterError
from greenopt.measure import select as select_mod
from greenopt.measure.estimate import EstimateMeter
from greenopt.measure.nvml import NvmlMeter, trapezoid_energy_j
from greenopt.measure.rapl import RaplMeter

# ---------------------------------------------------------------------------- mocked pynvml


def fake_pynvml(counter_mj=None, power_mw=lambda: 100_000, init_error=False, procs=()):
    """A stand-in ``pynvml`` module. ``counter_mj``: list of readings (None: not supported)."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    nv.NVMLError, nv.NVMLError_NotSupported = NVMLError, NVMLError_NotSupported
    readings = list(counter_mj) if counter_mj is not None else None
    nv.power_calls = 0

    def init():
        if init_error:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def energy(handle):
        if readings is None:
            raise NVMLError_NotSupported("Not Supported")
        return readings.pop(0)

    def power(handle):
        nv.power_calls += 1
        return power_mw()

    nv.nvmlInit = init
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    nv.nvmlDeviceGetHandleByPciBusId = lambda bus: "gpu-by-bus"
    nv.nvmlDeviceGetTotalEnergyConsumption = energy
    nv.nvmlDeviceGetPowerUsage = power
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA Fake100"
    nv.nvmlSystemGetDriverVersion = lambda: "575.51"
    nv.nvmlDeviceGetEnforcedPowerLimit = lambda h: 250_000
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=p) for p in procs]
    return nv


@pytest.fixture
def use_nvml(monkeypatch):
    def install(**kw):
        nv = fake_pynvml(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", nv)
        return nv
    return install


def test_nvml_counter_delta_and_short_window(use_nvml):
    use_nvml(counter_mj=[1_000, 5_000, 17_500])  # probe at init, then start, end
    meter = NvmlMeter()
    assert (meter.name, meter.tier, meter.min_window_s) == ("nvml", "M1", 1.0)
    with meter.window() as w:
        pass
    assert w.result.energy_j == pytest.approx(12.5)
    assert w.result.tier == "M1"
    assert w.result.flags == ("short-window",)


def test_nvml_window_long_enough_is_not_flagged(use_nvml):
    use_nvml(counter_mj=[0, 0, 2_000])
    meter = NvmlMeter()
    meter.min_window_s = 0.02
    with meter.window() as w:
        time.sleep(0.03)
    assert w.result.flags == ()
    assert w.result.energy_j == pytest.approx(2.0)


def test_nvml_counter_not_monotonic_flagged(use_nvml):
    use_nvml(counter_mj=[0, 9_000, 8_000])
    meter = NvmlMeter()
    with meter.window() as w:
        pass
    assert "counter-not-monotonic" in w.result.flags
    assert w.result.energy_j == 0.0


def test_nvml_falls_back_to_sampled_power(use_nvml):
    nv = use_nvml(counter_mj=None, power_mw=lambda: 150_000)
    meter = NvmlMeter(sample_hz=50)
    assert (meter.name, meter.tier) == ("nvml-sampled", "M2")
    with meter.window() as w:
        time.sleep(0.4)
    res = w.result
    assert res.tier == "M2"
    assert res.energy_j == pytest.approx(150.0 * res.duration_s, rel=0.03)
    assert nv.power_calls >= 10 * 0.4  # at least 10 Hz
    assert meter.device().boundary.startswith("GPU board (NVML power samples")


def test_trapezoid_integral_of_scripted_series():
    samples = [(0.0, 100.0), (1.0, 200.0), (3.0, 200.0), (3.5, 0.0)]
    assert trapezoid_energy_j(samples) == pytest.approx(150.0 + 400.0 + 50.0)
    assert trapezoid_energy_j([(0.0, 5.0)]) == 0.0
    ramp = [(t / 10, 10.0 + 4.0 * t / 10) for t in range(11)]  # linear: trapezoid is exact
    assert trapezoid_energy_j(ramp) == pytest.approx(10.0 + 2.0)


def test_sample_rate_below_10hz_rejected(use_nvml):
    use_nvml(counter_mj=[0])
    with pytest.raises(MeterError, match="10 Hz"):
        NvmlMeter(sample_hz=5)


def test_nvml_device_info(use_nvml):
    use_nvml(counter_mj=[0])
    info = NvmlMeter().device()
    assert (info.kind, info.name, info.driver, info.meter) == ("cuda", "NVIDIA Fake100", "575.51", "nvml")
    assert info.power_limit_w == 250.0
    assert info.boundary == "GPU board (NVML)"


def test_nvml_foreign_processes(use_nvml):
    use_nvml(counter_mj=[0], procs=(os.getpid(), 4242, 17))
    assert NvmlMeter().foreign_gpu_processes() == (17, 4242)
    use_nvml(counter_mj=[0], procs=(os.getpid(),))
    assert NvmlMeter().foreign_gpu_processes() == ()


def test_nvml_unavailable_raises_meter_error(use_nvml, monkeypatch):
    use_nvml(init_error=True)
    with pytest.raises(MeterError, match="NVML unavailable"):
        NvmlMeter()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with pytest.raises(MeterError, match="nvidia-ml-py"):
        NvmlMeter()


# ---------------------------------------------------------------------------- RAPL on a fake tree


def rapl_tree(root: Path, packages=((1_000, 10_000),), dram=None, psys=False) -> Path:
    """Writes a powercap tree; ``packages``/``dram``: (energy_uj, max_energy_range_uj) per socket."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "intel-rapl").mkdir(exist_ok=True)  # the control type folder, not a zone
    for i, (e, mx) in enumerate(packages):
        _zone(root / f"intel-rapl:{i}", f"package-{i}", e, mx)
        _zone(root / f"intel-rapl:{i}" / f"intel-rapl:{i}:0", "core", 5, 10_000)
        if dram is not None:
            _zone(root / f"intel-rapl:{i}" / f"intel-rapl:{i}:1", "dram", *dram[i])
    if psys:
        _zone(root / f"intel-rapl:{len(packages)}", "psys", 0, 10_000)
    return root


def _zone(d: Path, name: str, energy: int, max_range: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{max_range}\n")


def _set(root: Path, zone: str, energy: int) -> None:
    matches = list(root.glob(f"**/{zone}"))
    (matches[0] / "energy_uj").write_text(f"{energy}\n")


def test_rapl_deltas_summed_over_packages_and_dram(tmp_path):
    root = rapl_tree(tmp_path / "pc", packages=((1_000, 10**9), (2_000, 10**9)), dram=((10, 10**9), (20, 10**9)))
    meter = RaplMeter(root)
    assert [d.name for d in meter.domains] == ["package-0", "dram", "package-1", "dram"]
    with meter.window() as w:
        _set(root, "intel-rapl:0", 1_000 + 3_000_000)
        _set(root, "intel-rapl:1", 2_000 + 1_000_000)
        _set(root, "intel-rapl:0:1", 10 + 500_000)
        _set(root, "intel-rapl:0:0", 999_999_999)  # core subzone is inside the package: not counted
    assert w.result.energy_j == pytest.approx(4.5)
    assert (w.result.tier, meter.tier) == ("M1", "M1")
    assert meter.device().boundary == "CPU package + DRAM (RAPL)"


def test_rapl_wraparound(tmp_path):
    root = rapl_tree(tmp_path / "pc", packages=((9_000, 10_000),))
    meter = RaplMeter(root)
    with meter.window() as w:
        _set(root, "intel-rapl:0", 500)
    assert w.result.energy_j == pytest.approx(1_500 / 1e6)


def test_rapl_without_dram_and_psys_ignored(tmp_path):
    root = rapl_tree(tmp_path / "pc", psys=True)
    meter = RaplMeter(root)
    assert [d.name for d in meter.domains] == ["package-0"]
    assert meter.device().boundary == "CPU package (RAPL, no DRAM domain)"


def test_rapl_permission_error_names_file_and_fix(tmp_path, monkeypatch):
    root = rapl_tree(tmp_path / "pc")
    real_open = builtins.open

    def deny(path, *a, **kw):
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(MeterError) as e:
        RaplMeter(root)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(root / "intel-rapl:0" / "energy_uj") in msg
    assert f"sudo chmod a+r {root}/*rapl*/energy_uj" in msg and "root" in msg


def test_rapl_missing_tree(tmp_path):
    with pytest.raises(MeterError, match="no RAPL"):
        RaplMeter(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeterError, match="no RAPL package domain"):
        RaplMeter(tmp_path / "empty")


# ---------------------------------------------------------------------------- estimate


def test_estimate_is_cpu_time_times_watts(monkeypatch):
    meter = EstimateMeter(cpu_watts_per_core=4.0)
    clock = iter([10.0, 12.5])
    monkeypatch.setattr("greenopt.measure.estimate.time.process_time", lambda: next(clock))
    with meter.window() as w:
        pass
    assert w.result.energy_j == pytest.approx(10.0)
    assert w.result.tier == "E1"


def test_estimate_real_cpu_work_counts():
    meter = EstimateMeter()
    with meter.window() as w:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.05:
            pass
    assert w.result.energy_j >= 0.05 * 10.0 * 0.9
    info = meter.device()
    assert info.meter == "estimate" and "10.0 W/core" in info.boundary and "estimate" in info.boundary


def test_estimate_rejects_non_positive_watts():
    with pytest.raises(ConfigError, match="--cpu-watts"):
        EstimateMeter(cpu_watts_per_core=0)


# ---------------------------------------------------------------------------- selection


def _no_rapl(*a, **kw):
    raise MeterError("no RAPL powercap tree (test)")


def test_select_explicit_names(use_nvml, monkeypatch, tmp_path):
    assert select_mod.select_meter("estimate", cpu_watts=5.0).cpu_watts_per_core == 5.0
    with pytest.raises(MeterError, match="unknown meter"):
        select_mod.select_meter("joulemeter")
    use_nvml(init_error=True)
    with pytest.raises(MeterError, match="NVML unavailable"):
        select_mod.select_meter("nvml")
    monkeypatch.setattr(select_mod, "RaplMeter", _no_rapl)
    with pytest.raises(MeterError, match="no RAPL"):
        select_mod.select_meter("rapl")


def test_select_auto_cpu_prefers_rapl_then_estimate(monkeypatch, tmp_path):
    root = rapl_tree(tmp_path / "pc")
    monkeypatch.setattr(select_mod, "RaplMeter", functools.partial(RaplMeter, root))
    assert select_mod.select_meter(device="cpu").name == "rapl"
    monkeypatch.setattr(select_mod, "RaplMeter", _no_rapl)
    meter = select_mod.select_meter(device="cpu", cpu_watts=7.0)
    assert (meter.name, meter.tier, meter.cpu_watts_per_core) == ("estimate", "E1", 7.0)


def test_select_auto_cuda(use_nvml, monkeypatch):
    use_nvml(counter_mj=[0])
    assert select_mod.select_meter(device="cuda").name == "nvml"
    use_nvml(init_error=True)
    monkeypatch.setattr(select_mod, "RaplMeter", _no_rapl)
    meter = select_mod.select_meter(device="cuda:0")
    assert meter.name == "estimate"
    assert any("GPU energy not included" in n for n in meter.device().notes)
    with pytest.raises(ConfigError, match="use cpu, cuda, cuda:N or auto"):
        select_mod.select_meter(device="tpu")


def test_meter_report(use_nvml, monkeypatch):
    use_nvml(init_error=True)
    monkeypatch.setattr(select_mod, "RaplMeter", _no_rapl)
    report = {s.name: s for s in select_mod.meter_report()}
    assert list(report) == ["nvml", "rapl", "estimate"]
    assert not report["nvml"].available and "NVML unavailable" in report["nvml"].reason
    assert not report["rapl"].available and report["rapl"].tier == "M1"
    assert report["estimate"].available and report["estimate"].tier == "E1"
    assert "W/core" in report["estimate"].reason
