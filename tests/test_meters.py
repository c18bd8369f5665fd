"""Meters on CPU: NVML with a mocked pynvml and torch, RAPL and hwmon on fake sysfs trees, zeusd on a
fake socket server, the estimate and its TDP table, selection, and scripts/gpu_check.py --fake."""

from __future__ import annotations

import builtins
import functools
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from greenopt.config import protocol_preset
from greenopt.errors import ConfigError, MeterError
from greenopt.measure import nvml as nvml_mod
from greenopt.measure import select as select_mod
from greenopt.measure import tdp
from greenopt.measure.estimate import EstimateMeter
from greenopt.measure.hwmon import HwmonMeter
from greenopt.measure.nvml import NvmlMeter, estimate_update_period_s, model_cuda_device, trapezoid_energy_j
from greenopt.measure.rapl import RaplMeter, ZeusdRaplMeter, zeusd_socket_path
from greenopt.measure.workload import measure
from greenopt.testing import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- mocked pynvml and torch.cuda


def fake_pynvml(counter_mj=None, power_mw=lambda: 100_000, init_error=False, procs=(), buses=None, mig=None):
    """A stand-in ``pynvml`` module.

    ``counter_mj``: list of readings or a callable (None: not supported); ``procs``: PIDs or
    "error"; ``buses``: PCI bus id -> handle (None: any bus id opens "gpu-by-bus"); ``mig``:
    MIG mode (None: not supported, "error": unreadable).
    """
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_NotFound(NVMLError):
        pass

    class NVMLError_NoPermission(NVMLError):
        pass

    nv.NVMLError, nv.NVMLError_NotSupported = NVMLError, NVMLError_NotSupported
    nv.NVML_DEVICE_MIG_ENABLE = 1
    readings = list(counter_mj) if isinstance(counter_mj, (list, tuple)) else None
    nv.power_calls = 0
    nv.bus_lookups = []

    def init():
        if init_error:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def energy(handle):
        if counter_mj is None:
            raise NVMLError_NotSupported("Not Supported")
        return counter_mj() if callable(counter_mj) else readings.pop(0)

    def power(handle):
        nv.power_calls += 1
        return power_mw()

    def by_bus(bus):
        nv.bus_lookups.append(bus)
        if buses is None:
            return "gpu-by-bus"
        if bus not in buses:
            raise NVMLError_NotFound("Not Found")
        return buses[bus]

    def by_index(i):
        raise AssertionError("the meter must never fall back to the raw NVML index")

    def processes(handle):
        if procs == "error":
            raise NVMLError_NoPermission("Insufficient Permissions")
        return [types.SimpleNamespace(pid=p) for p in procs]

    def mig_mode(handle):
        if mig is None:
            raise NVMLError_NotSupported("Not Supported")
        if mig == "error":
            raise NVMLError("Unknown Error")
        return [mig, mig]

    nv.nvmlInit = init
    nv.nvmlDeviceGetHandleByIndex = by_index
    nv.nvmlDeviceGetHandleByPciBusId = by_bus
    nv.nvmlDeviceGetTotalEnergyConsumption = energy
    nv.nvmlDeviceGetPowerUsage = power
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA Fake100"
    nv.nvmlSystemGetDriverVersion = lambda: "575.51"
    nv.nvmlDeviceGetEnforcedPowerLimit = lambda h: 250_000
    nv.nvmlDeviceGetComputeRunningProcesses = processes
    nv.nvmlDeviceGetMigMode = mig_mode
    return nv


def fake_cuda(monkeypatch, count=1, buses=(0x3B, 0x5E)):
    """Makes torch report ``count`` CUDA devices with the given PCI bus numbers (no context held)."""
    props = [types.SimpleNamespace(pci_domain_id=0, pci_bus_id=b, pci_device_id=0) for b in buses[:count]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])


@pytest.fixture
def use_nvml(monkeypatch):
    """Installs a fake pynvml and one fake CUDA device; pass ``cuda=0`` for a torch without CUDA."""
    def install(cuda=1, **kw):
        nv = fake_pynvml(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", nv)
        fake_cuda(monkeypatch, count=cuda)
        return nv
    return install


def test_nvml_counter_delta_and_short_window(use_nvml):
    use_nvml(counter_mj=[1_000, 5_000, 17_500])  # probe at init, then start, end
    meter = NvmlMeter(counter_period_s=0.1)
    assert (meter.name, meter.tier, meter.min_window_s) == ("nvml", "M1", pytest.approx(10.0))
    with meter.window() as w:
        pass
    assert w.result.energy_j == pytest.approx(12.5)
    assert w.result.tier == "M1"
    assert w.result.flags == ("short-window",)


def test_nvml_window_long_enough_is_not_flagged(use_nvml):
    use_nvml(counter_mj=[0, 0, 2_000])
    meter = NvmlMeter(counter_period_s=0.1)
    meter.min_window_s = 0.02
    with meter.window() as w:
        time.sleep(0.03)
    assert w.result.flags == ()
    assert w.result.energy_j == pytest.approx(2.0)


def test_nvml_counter_not_monotonic_flagged(use_nvml):
    use_nvml(counter_mj=[0, 9_000, 8_000])
    meter = NvmlMeter(counter_period_s=0.1)
    with meter.window() as w:
        pass
    assert "counter-not-monotonic" in w.result.flags
    assert w.result.energy_j == 0.0


def test_nvml_falls_back_to_sampled_power(use_nvml):
    nv = use_nvml(counter_mj=None, power_mw=lambda: 150_000)
    meter = NvmlMeter(sample_hz=50)
    assert (meter.name, meter.tier, meter.min_window_s) == ("nvml-sampled", "M2", pytest.approx(10.0))
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
    info = NvmlMeter(counter_period_s=0.05).device()
    assert (info.kind, info.name, info.driver, info.meter) == ("cuda", "NVIDIA Fake100", "575.51", "nvml")
    assert info.power_limit_w == 250.0
    assert info.boundary == "GPU board (NVML)"
    assert any("update period 50 ms (given); windows >= 5.0 s" in n for n in info.notes)


def test_nvml_foreign_processes(use_nvml):
    use_nvml(counter_mj=[0], procs=(os.getpid(), 4242, 17))
    assert NvmlMeter(counter_period_s=0.1).foreign_gpu_processes() == (17, 4242)
    use_nvml(counter_mj=[0], procs=(os.getpid(),))
    assert NvmlMeter(counter_period_s=0.1).foreign_gpu_processes() == ()


def test_nvml_unavailable_raises_meter_error(use_nvml, monkeypatch):
    use_nvml(init_error=True)
    with pytest.raises(MeterError, match="NVML unavailable"):
        NvmlMeter()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with pytest.raises(MeterError, match="nvidia-ml-py"):
        NvmlMeter()


# ---------------------------------------------------------------------------- NVML: which GPU, one GPU


def test_nvml_maps_torch_device_to_nvml_by_pci_bus_id(use_nvml, monkeypatch):
    nv = use_nvml(counter_mj=lambda: 0, buses={"00000000:3b:00.0": "gpu-a", "00000000:5e:00.0": "gpu-b"})
    fake_cuda(monkeypatch, count=2)
    meter = NvmlMeter(1, counter_period_s=0.1)
    assert (meter.pci_bus_id, meter._handle) == ("00000000:5e:00.0", "gpu-b")
    assert nv.bus_lookups == ["00000000:5e:00.0"]


def test_nvml_failed_bus_id_lookup_is_an_error_never_the_raw_index(use_nvml, monkeypatch):
    use_nvml(counter_mj=lambda: 0, buses={"00000000:3b:00.0": "gpu-a"})
    fake_cuda(monkeypatch, count=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(MeterError) as e:
        NvmlMeter(1, counter_period_s=0.1)  # the fake's by-index lookup would raise AssertionError
    msg = str(e.value)
    assert "\n" not in msg and "00000000:5e:00.0" in msg and "cuda:1" in msg and "CUDA_VISIBLE_DEVICES=2,3" in msg


def test_nvml_needs_torch_to_see_the_device(use_nvml, monkeypatch):
    use_nvml(cuda=0, counter_mj=lambda: 0)
    with pytest.raises(MeterError, match="torch sees no CUDA device"):
        NvmlMeter()
    fake_cuda(monkeypatch, count=1)
    with pytest.raises(MeterError, match="CUDA device 3 does not exist: torch sees 1"):
        NvmlMeter(3)
    meter = NvmlMeter(3, pci_bus_id="00000000:99:00.0", counter_period_s=0.1)  # given: no torch lookup
    assert meter.pci_bus_id == "00000000:99:00.0"


class _Placed(torch.nn.Module):
    """A module whose tensors report the given devices (CUDA devices need no GPU to be named)."""

    def __init__(self, *devices):
        super().__init__()
        self._devices = [torch.device(d) for d in devices]

    def parameters(self, recurse=True):
        return iter(types.SimpleNamespace(device=d) for d in self._devices)

    def buffers(self, recurse=True):
        return iter(())


def test_model_must_sit_on_one_gpu(use_nvml):
    assert model_cuda_device(_Placed("cuda:1", "cuda:1")) == 1
    with pytest.raises(MeterError, match=r"tensors are on cuda:0, cuda:1;"):
        model_cuda_device(_Placed("cuda:0", "cuda:1"))
    with pytest.raises(MeterError, match=r"tensors are on cpu;"):
        model_cuda_device(torch.nn.Linear(2, 2))
    with pytest.raises(MeterError, match=r"cpu, cuda:0"):
        model_cuda_device(_Placed("cuda:0", "cpu"))
    with pytest.raises(MeterError, match=r"meta"):
        model_cuda_device(_Placed("cuda:0", "meta"))
    use_nvml(counter_mj=lambda: 0)
    meter = NvmlMeter(0, counter_period_s=0.1)
    meter.check_model(_Placed("cuda:0"))
    with pytest.raises(MeterError, match="model is on cuda:1 but the NVML meter measures cuda:0"):
        meter.check_model(_Placed("cuda:1"))


def test_mig_mode_flags_every_window_and_says_so(use_nvml):
    use_nvml(counter_mj=lambda: 0, mig=1)
    meter = NvmlMeter(counter_period_s=0.1)
    meter.min_window_s = 0.0
    with meter.window() as w:
        pass
    assert meter.mig and w.result.flags == ("mig-whole-gpu",)
    info = meter.device()
    assert "whole GPU" in info.boundary and any("MIG mode on" in n for n in info.notes)
    for mig in (0, None, "error"):  # off, not supported, unreadable (noted, taken as off)
        use_nvml(counter_mj=lambda: 0, mig=mig)
        meter = NvmlMeter(counter_period_s=0.1)
        assert not meter.mig
        assert any("MIG mode unreadable" in n for n in meter.notes) == (mig == "error")


def test_failed_process_listing_flags_the_measurement(use_nvml):
    use_nvml(counter_mj=lambda: int(time.perf_counter() * 50_000), procs="error")
    meter = NvmlMeter(counter_period_s=0.001)
    meter.min_window_s = 0.0
    meter.check_model = lambda model: None  # the fake GPU meters a CPU model
    assert meter.foreign_gpu_processes() == () and meter.process_check_failed
    with meter.window() as w:
        pass
    assert "gpu-process-check-failed" in w.result.flags
    m = measure(tiny_llama(), tiny_tokenizer(), protocol_preset("smoke"), meter)
    assert "gpu-process-check-failed" in m.flags and "foreign-gpu-processes" not in m.flags
    assert (m.source_tier, m.tier) == ("M1", "M2")


# ---------------------------------------------------------------------------- NVML: window length


class _FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_update_period_estimate_from_polling():
    clock = _FakeClock()
    period = estimate_update_period_s(lambda: int(clock.t / 0.02), clock=clock, sleep=clock.sleep)
    assert period == pytest.approx(0.02, abs=0.0015)
    still = estimate_update_period_s(lambda: 7, clock=clock, sleep=clock.sleep)
    assert still is None


def test_min_window_is_100_update_periods(use_nvml):
    use_nvml(counter_mj=lambda: int(time.perf_counter() / 0.02) * 1_000)
    meter = NvmlMeter()  # polls the fake counter, which steps every 20 ms
    assert meter.counter_period_s == pytest.approx(0.02, rel=0.3)
    assert meter.min_window_s == pytest.approx(100 * meter.counter_period_s)
    assert any("(measured)" in n for n in meter.notes)
    use_nvml(counter_mj=lambda: int(time.perf_counter() / 0.001))
    assert NvmlMeter().min_window_s == nvml_mod.MIN_WINDOW_FLOOR_S  # never under 1 s (ENERGY.md §3)


def test_counter_that_does_not_move_assumes_100ms(use_nvml):
    use_nvml(counter_mj=lambda: 123)
    meter = NvmlMeter()
    assert (meter.counter_period_s, meter.min_window_s) == (nvml_mod.DEFAULT_COUNTER_PERIOD_S, pytest.approx(10.0))
    assert any("assumed" in n for n in meter.notes)


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


# ---------------------------------------------------------------------------- RAPL through zeusd


class _Zeusd:
    """State of a fake zeusd: packages, their counters, and what the daemon requires."""

    def __init__(self, cpus=((0, True), (1, False)), legacy=False, token=None, groups=("cpu-read",)):
        self.cpus, self.legacy, self.token, self.groups = dict(cpus), legacy, token, list(groups)
        self.cpu_uj = {i: 1_000 * (i + 1) for i in self.cpus}
        self.dram_uj = {i: 10 for i, d in self.cpus.items() if d}
        self.requests: list[str] = []


def _handler(state: _Zeusd, http11: bool):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if http11 else "HTTP/1.0"

        def log_message(self, *a):
            pass

        def _send(self, status, body):
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _entry(self, i, dram):
            return {"cpu_energy_uj": state.cpu_uj[i], "dram_energy_uj": state.dram_uj.get(i) if dram else None}

        def do_GET(self):
            url = urlparse(self.path)
            state.requests.append(f"GET {url.path}")
            if state.token and self.headers.get("Authorization") != f"Bearer {state.token}" \
                    and url.path != "/discover":
                return self._send(401, {"error": "missing token"})
            parts = url.path.strip("/").split("/")
            if state.legacy:
                if len(parts) == 3 and parts[2] == "supports_dram_energy" and int(parts[1]) in state.cpus:
                    return self._send(200, {"dram_available": state.cpus[int(parts[1])]})
                return self._send(404, {"error": "not found"})
            if url.path == "/discover":
                return self._send(200, {"gpus": [], "cpus": [{"id": i, "dram_available": d}
                                                           for i, d in state.cpus.items()],
                                        "enabled_api_groups": state.groups, "auth_required": bool(state.token)})
            if url.path == "/cpu/get_cumulative_energy":
                q = parse_qs(url.query)
                assert q["cpu"] == ["true"] and q["dram"] in (["true"], ["false"])
                return self._send(200, {str(i): self._entry(i, q["dram"] == ["true"]) for i in state.cpus})
            return self._send(404, {"error": "not found"})

        def do_POST(self):
            state.requests.append(f"POST {self.path}")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            parts = self.path.strip("/").split("/")
            if state.legacy and len(parts) == 3 and parts[2] == "get_index_energy":
                return self._send(200, self._entry(int(parts[1]), body["dram"]))
            return self._send(404, {"error": "not found"})

    return Handler


@pytest.fixture
def zeusd():
    """Starts fake zeusd servers on unix sockets; yields ``start(state, http11=True) -> socket path``."""
    servers, folder = [], tempfile.mkdtemp(prefix="zd")  # short path: unix socket names are <= 107 bytes

    def start(state: _Zeusd, http11: bool = True) -> Path:
        path = Path(folder) / f"zeusd{len(servers)}.sock"
        server = socketserver.ThreadingUnixStreamServer(str(path), _handler(state, http11))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return path

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("http11", [True, False])
def test_zeusd_cumulative_energy_summed_over_packages(zeusd, http11):
    state = _Zeusd()
    meter = ZeusdRaplMeter(zeusd(state, http11))
    assert (meter.name, meter.tier, meter.cpus, meter.legacy) == ("rapl-zeusd", "M1", ((0, True), (1, False)), False)
    with meter.window() as w:
        state.cpu_uj[0] += 2_000_000
        state.cpu_uj[1] += 1_000_000
        state.dram_uj[0] += 500_000
    assert w.result.energy_j == pytest.approx(3.5)
    assert "counter-not-monotonic" not in w.result.flags
    info = meter.device()
    assert info.meter == "rapl-zeusd" and info.boundary == "CPU package + DRAM (RAPL via zeusd)"
    assert "GET /cpu/get_cumulative_energy" in state.requests


def test_zeusd_legacy_api(zeusd):
    state = _Zeusd(cpus=((0, False),), legacy=True)
    meter = ZeusdRaplMeter(zeusd(state))
    assert meter.legacy and meter.cpus == ((0, False),)
    with meter.window() as w:
        state.cpu_uj[0] += 250_000
    assert w.result.energy_j == pytest.approx(0.25)
    assert "POST /cpu/0/get_index_energy" in state.requests
    assert meter.device().boundary == "CPU package (RAPL via zeusd, no DRAM domain)"


def test_zeusd_token_and_api_groups(zeusd, monkeypatch):
    monkeypatch.delenv("ZEUSD_TOKEN", raising=False)
    path = zeusd(_Zeusd(token="s3cret"))
    with pytest.raises(MeterError, match="requires a token; set ZEUSD_TOKEN"):
        ZeusdRaplMeter(path)
    monkeypatch.setenv("ZEUSD_TOKEN", "s3cret")
    assert ZeusdRaplMeter(path).cpus
    with pytest.raises(MeterError, match="HTTP 401"):
        ZeusdRaplMeter(path, token="wrong")
    with pytest.raises(MeterError, match="cpu-read API disabled"):
        ZeusdRaplMeter(zeusd(_Zeusd(groups=("gpu-read",))))


def test_zeusd_counter_going_back_is_flagged(zeusd):
    state = _Zeusd(cpus=((0, False),))
    meter = ZeusdRaplMeter(zeusd(state))
    with meter.window() as w:
        state.cpu_uj[0] = 5  # daemon restarted
    assert "counter-not-monotonic" in w.result.flags and w.result.energy_j == 0.0


def test_zeusd_socket_missing_or_dead(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEUSD_SOCK_PATH", str(tmp_path / "none.sock"))
    assert zeusd_socket_path() == tmp_path / "none.sock"
    with pytest.raises(MeterError, match="no zeusd socket at"):
        ZeusdRaplMeter()
    monkeypatch.delenv("ZEUSD_SOCK_PATH")
    monkeypatch.setattr("greenopt.measure.rapl.ZEUSD_SOCKET_PATHS", (str(tmp_path / "default.sock"),))
    assert zeusd_socket_path() is None
    with pytest.raises(MeterError, match="ZEUSD_SOCK_PATH unset"):
        ZeusdRaplMeter()
    dead = tmp_path / "dead.sock"
    dead.write_text("")  # a file, no daemon behind it
    with pytest.raises(MeterError, match="cannot reach zeusd"):
        ZeusdRaplMeter(dead)


# ---------------------------------------------------------------------------- hwmon (amd_energy, zenergy)


def hwmon_tree(root: Path, devices) -> Path:
    """Writes hwmonN folders; ``devices``: (driver, {label: energy_uj}) per folder."""
    for n, (driver, sensors) in enumerate(devices):
        d = root / f"hwmon{n}"
        d.mkdir(parents=True)
        (d / "name").write_text(driver + "\n")
        for k, (label, uj) in enumerate(sensors.items(), start=1):
            (d / f"energy{k}_input").write_text(f"{uj}\n")
            (d / f"energy{k}_label").write_text(label + "\n")
    return root


def _hw_set(root: Path, label: str, uj: int) -> None:
    for f in root.glob("hwmon*/energy*_label"):
        if f.read_text().strip() == label:
            (f.parent / f.name.replace("_label", "_input")).write_text(f"{uj}\n")


def test_hwmon_sums_socket_counters(tmp_path):
    root = hwmon_tree(tmp_path / "hw", [("k10temp", {}), ("amd_energy", {
        "Ecore000": 5, "Ecore001": 5, "Esocket0": 1_000, "Esocket1": 2_000})])
    meter = HwmonMeter(root)
    assert meter.driver == "amd_energy" and [s.label for s in meter.sensors] == ["Esocket0", "Esocket1"]
    with meter.window() as w:
        _hw_set(root, "Esocket0", 1_000 + 3_000_000)
        _hw_set(root, "Esocket1", 2_000 + 1_000_000)
        _hw_set(root, "Ecore000", 10**9)  # inside the socket counter: not counted again
    assert w.result.energy_j == pytest.approx(4.0)
    assert (w.result.tier, meter.tier, meter.name) == ("M1", "M1", "hwmon")
    assert meter.device().boundary == "CPU package (hwmon amd_energy, no DRAM)"


def test_hwmon_zenergy_cores_only_and_driver_preference(tmp_path):
    root = hwmon_tree(tmp_path / "z", [("zenergy", {"Ecore000": 0, "Ecore001": 0})])
    meter = HwmonMeter(root)
    with meter.window() as w:
        _hw_set(root, "Ecore000", 1_000_000)
        _hw_set(root, "Ecore001", 500_000)
    assert w.result.energy_j == pytest.approx(1.5)
    assert "cores only" in meter.device().boundary
    both = hwmon_tree(tmp_path / "both", [("zenergy", {"Esocket0": 0}), ("amd_energy", {"Esocket0": 0})])
    assert HwmonMeter(both).driver == "amd_energy"


def test_hwmon_backwards_counter_flagged_and_missing_driver(tmp_path):
    root = hwmon_tree(tmp_path / "hw", [("amd_energy", {"Esocket0": 9_000})])
    meter = HwmonMeter(root)
    with meter.window() as w:
        _hw_set(root, "Esocket0", 10)
    assert "counter-not-monotonic" in w.result.flags
    with pytest.raises(MeterError, match="no amd_energy or zenergy hwmon driver"):
        HwmonMeter(hwmon_tree(tmp_path / "other", [("coretemp", {})]))
    with pytest.raises(MeterError, match="no hwmon tree"):
        HwmonMeter(tmp_path / "absent")


def test_hwmon_permission_error_names_file_and_fix(tmp_path, monkeypatch):
    root = hwmon_tree(tmp_path / "hw", [("amd_energy", {"Esocket0": 1})])
    real_open = builtins.open

    def deny(path, *a, **kw):
        if str(path).endswith("_input"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(MeterError) as e:
        HwmonMeter(root)
    assert "energy1_input" in str(e.value) and "sudo chmod a+r" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- estimate and the TDP table


def cpuinfo(tmp_path: Path, model: str, cores: int | None = 8, sockets: int = 1, vm: bool = False) -> Path:
    """A fake /proc/cpuinfo with one block per core (no hyperthreads)."""
    flags = "fpu sse2 avx2" + (" hypervisor" if vm else "")
    blocks = []
    for s in range(sockets):
        for c in range(cores or 1):
            lines = [f"processor\t: {len(blocks)}", f"model name\t: {model}", f"physical id\t: {s}",
                     f"core id\t\t: {c}", f"flags\t\t: {flags}"]
            if cores:
                lines.insert(3, f"cpu cores\t: {cores}")
            blocks.append("\n".join(lines))
    path = tmp_path / "cpuinfo"
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def test_estimate_is_cpu_time_times_watts(monkeypatch):
    meter = EstimateMeter(cpu_watts_per_core=4.0)
    clock = iter([10.0, 12.5])
    monkeypatch.setattr("greenopt.measure.estimate.time.process_time", lambda: next(clock))
    with meter.window() as w:
        pass
    assert w.result.energy_j == pytest.approx(10.0)
    assert w.result.tier == "E1"


def test_estimate_real_cpu_work_counts(tmp_path):
    meter = EstimateMeter(cpuinfo=cpuinfo(tmp_path, "Fancy RISC-V Board"))
    with meter.window() as w:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.05:
            pass
    assert w.result.energy_j >= 0.05 * 10.0 * 0.9
    info = meter.device()
    assert info.meter == "estimate" and "10.0 W/core" in info.boundary and "estimate" in info.boundary
    assert info.notes == ("no TDP row for Fancy RISC-V Board; default 10 W/core",)


def test_estimate_rejects_non_positive_watts():
    with pytest.raises(ConfigError, match="--cpu-watts"):
        EstimateMeter(cpu_watts_per_core=0)


def test_estimate_watts_from_the_tdp_table(tmp_path):
    meter = EstimateMeter(cpuinfo=cpuinfo(tmp_path, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", cores=32, sockets=2))
    assert meter.cpu_watts_per_core == pytest.approx(205 / 32)
    (note,) = meter.device().notes
    assert note.startswith("TDP table: Intel Xeon Gold 6338 205 W / 32 cores")
    assert "6.4 W/core" in meter.device().boundary
    given = EstimateMeter(7.5, cpuinfo=cpuinfo(tmp_path, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", cores=32))
    assert given.cpu_watts_per_core == 7.5 and given.device().notes == ("--cpu-watts 7.5 W/core (given)",)


@pytest.mark.parametrize("name,row", [
    ("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "Intel Xeon Gold 6338"),
    ("AMD EPYC 7763 64-Core Processor", "AMD EPYC 7763"),
    ("12th Gen Intel(R) Core(TM) i7-12700H", "Intel Core i7-12700H"),
    ("AMD Ryzen 7 5800H with Radeon Graphics", "AMD Ryzen 7 5800H"),
    ("Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz", "Intel Xeon E5-2690 v4"),
    ("Intel(R) Xeon(R) Platinum 8480+", "Intel Xeon Platinum 8480+"),
    ("AMD Ryzen Threadripper PRO 5995WX 64-Cores", "AMD Ryzen Threadripper PRO 5995WX"),
    ("Intel(R) Xeon(R) Processor", None),
    ("Intel(R) Xeon(R) CPU @ 2.20GHz", None),
    ("AMD EPYC-Rome Processor", None),
])
def test_tdp_rows_match_cpuinfo_names(name, row):
    found = tdp.lookup_tdp(name)
    assert (found.name if found else None) == row


def test_tdp_cores_from_name_table_or_default_in_a_vm(tmp_path):
    amd = tdp.cpu_watts_per_core(cpuinfo(tmp_path, "AMD EPYC 7763 64-Core Processor", cores=4, vm=True))
    assert amd.watts_per_core == pytest.approx(280 / 64) and "(cores from the CPU name)" in amd.note
    vm = tdp.cpu_watts_per_core(cpuinfo(tmp_path, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", cores=4, vm=True))
    assert vm.watts_per_core == 10.0 and "virtual machine" in vm.note and vm.note.endswith("default 10 W/core")
    unknown = tdp.cpu_watts_per_core(cpuinfo(tmp_path, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", cores=None))
    assert unknown.watts_per_core == pytest.approx(205.0)  # one core id seen per package
    table = tmp_path / "t.csv"
    table.write_text("# test table\nName,TDP,Cores\nIntel Xeon Gold 6338,205,32\n")
    tdp.load_table.cache_clear()
    own = tdp.cpu_watts_per_core(cpuinfo(tmp_path, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", cores=4, vm=True),
                                 path=table)
    assert own.watts_per_core == pytest.approx(205 / 32) and "(cores from the table)" in own.note


def test_tdp_table_is_small_attributed_and_trimmed():
    text = tdp.TABLE_PATH.read_text()
    assert len(text.encode()) < 100_000
    assert "codecarbon" in text.lower() and "MIT License" in text
    rows = tdp.load_table(tdp.TABLE_PATH)
    assert len(rows) > 1000
    assert all(r.name.startswith(("Intel Xeon", "Intel Core", "AMD EPYC", "AMD Ryzen")) for r in rows.values())
    assert all(r.tdp_w > 0 for r in rows.values())


def test_missing_tdp_table_falls_back_to_the_default(tmp_path):
    found = tdp.cpu_watts_per_core(cpuinfo(tmp_path, "AMD EPYC 7763 64-Core Processor"), path=tmp_path / "none.csv")
    assert found.watts_per_core == 10.0 and found.note == "TDP table unreadable (FileNotFoundError); default 10 W/core"


# ---------------------------------------------------------------------------- selection


def _no_meter(*a, **kw):
    raise MeterError("not here (test)")


@pytest.fixture
def no_cpu_counters(monkeypatch):
    for name in ("RaplMeter", "ZeusdRaplMeter", "HwmonMeter"):
        monkeypatch.setattr(select_mod, name, _no_meter)


def test_select_explicit_names(use_nvml, no_cpu_counters):
    assert select_mod.select_meter("estimate", cpu_watts=5.0).cpu_watts_per_core == 5.0
    with pytest.raises(MeterError, match="unknown meter"):
        select_mod.select_meter("joulemeter")
    use_nvml(init_error=True)
    with pytest.raises(MeterError, match="NVML unavailable"):
        select_mod.select_meter("nvml")
    with pytest.raises(MeterError, match=r"no readable CPU energy counter \(RAPL: .* \| zeusd: .* \| hwmon: "):
        select_mod.select_meter("rapl")


def test_select_auto_cpu_prefers_rapl_then_zeusd_then_hwmon_then_estimate(monkeypatch, tmp_path, no_cpu_counters):
    meter = select_mod.select_meter(device="cpu", cpu_watts=7.0)
    assert (meter.name, meter.tier, meter.cpu_watts_per_core) == ("estimate", "E1", 7.0)
    hw = hwmon_tree(tmp_path / "hw", [("amd_energy", {"Esocket0": 1})])
    monkeypatch.setattr(select_mod, "HwmonMeter", functools.partial(HwmonMeter, hw))
    meter = select_mod.select_meter(device="cpu")
    assert meter.name == "hwmon" and any(n.startswith("chosen because RAPL: not here") for n in meter.notes)
    monkeypatch.setattr(select_mod, "ZeusdRaplMeter", lambda: types.SimpleNamespace(name="rapl-zeusd", notes=()))
    assert select_mod.select_meter("rapl").name == "rapl-zeusd"
    monkeypatch.setattr(select_mod, "RaplMeter", functools.partial(RaplMeter, rapl_tree(tmp_path / "pc")))
    assert select_mod.select_meter(device="cpu").name == "rapl"


def test_select_auto_cuda(use_nvml, no_cpu_counters):
    use_nvml(counter_mj=lambda: int(time.perf_counter() / 0.001))
    assert select_mod.select_meter(device="cuda").name == "nvml"
    use_nvml(init_error=True)
    meter = select_mod.select_meter(device="cuda:0")
    assert meter.name == "estimate"
    assert any("GPU energy not included" in n for n in meter.device().notes)
    with pytest.raises(ConfigError, match="use cpu, cuda, cuda:N or auto"):
        select_mod.select_meter(device="tpu")


def test_meter_report(use_nvml, no_cpu_counters):
    use_nvml(init_error=True)
    report = {s.name: s for s in select_mod.meter_report()}
    assert list(report) == ["nvml", "rapl", "estimate"]
    assert not report["nvml"].available and "NVML unavailable" in report["nvml"].reason
    assert not report["rapl"].available and report["rapl"].tier == "M1"
    assert report["estimate"].available and report["estimate"].tier == "E1"
    assert "W/core" in report["estimate"].reason


# ---------------------------------------------------------------------------- scripts/gpu_check.py


def test_gpu_check_fake_runs_on_cpu(tmp_path, monkeypatch, capsys):
    import gpu_check  # scripts/ is on the test path (pyproject)

    monkeypatch.setitem(sys.modules, "pynvml", None)  # the fake NVML it installs is undone afterwards
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--fake"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["fake"] and doc["meter"] == "nvml" and doc["device"]["driver"] == "fake"
    assert doc["protocol"]["id"] == "GO-1/b1/p8-n4" and doc["mode"] == "compare"
    by_name = {v["name"]: v for v in doc["variants"]}
    assert list(by_name) == ["baseline", "int8-wo", "int4-wo", "sparse-2:4", "depth-25%"]
    assert by_name["int4-wo"]["status"] == "skipped" and "CUDA" in by_name["int4-wo"]["reason"]
    for name in ("baseline", "int8-wo", "sparse-2:4", "depth-25%"):
        v = by_name[name]
        assert v["status"] == "ok" and v["joules_per_token"] > 0 and v["tier"] in ("M1", "M2") and v["eei"] > 0
    assert by_name["baseline"]["eei"] == 100.0
    assert by_name["depth-25%"]["weight_bytes"] < by_name["baseline"]["weight_bytes"]


def test_gpu_check_refuses_without_cuda(tmp_path, monkeypatch, capsys):
    import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no CUDA device" in err
    assert not (tmp_path / "g.json").exists()
    sh = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert sh.returncode == 0, sh.stderr

