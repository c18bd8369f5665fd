"""NVML energy counter around real generation on a CUDA GPU (skipped without CUDA).

The full five-variant check on a ~1B model is scripts/gpu_check.sh (about 7 minutes).
"""

from __future__ import annotations

import time

import pytest
import torch

from greenopt.config import protocol_preset
from greenopt.errors import MeterError
from greenopt.measure.nvml import MIN_WINDOW_FLOOR_S, WINDOW_PERIODS, NvmlMeter, model_cuda_device
from greenopt.measure.workload import load_prompts, measure
from greenopt.testing import tiny_llama, tiny_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def cuda_model():
    return tiny_llama().cuda()


@pytest.fixture(scope="module")
def meter():
    return NvmlMeter()


def test_meter_opens_the_gpu_torch_computes_on(meter):
    nv = meter._nvml
    bus = nv.nvmlDeviceGetPciInfo(meter._handle).busId
    bus = bus.decode() if isinstance(bus, bytes) else bus
    assert bus.lower() == meter.pci_bus_id.lower()
    assert meter.device().name in torch.cuda.get_device_name(0)  # MIG names add the profile


def test_counter_update_period_sets_the_minimum_window(meter):
    assert 0.0005 <= meter.counter_period_s <= 1.0, meter.notes
    assert meter.min_window_s == pytest.approx(max(MIN_WINDOW_FLOOR_S, WINDOW_PERIODS * meter.counter_period_s))


def test_check_model_wants_one_gpu(meter, cuda_model):
    meter.check_model(cuda_model)
    assert model_cuda_device(cuda_model) == 0
    with pytest.raises(MeterError, match="tensors are on cpu"):
        meter.check_model(tiny_llama())
    split = tiny_llama().cuda()
    split.model.layers[0].to("cpu")
    with pytest.raises(MeterError, match="cpu, cuda:0"):
        meter.check_model(split)


def test_counter_reads_energy_around_generation(meter, cuda_model):
    ids = load_prompts(tiny_tokenizer(), protocol_preset("cpu"))[:4].cuda()
    t0 = time.perf_counter()
    with torch.inference_mode(), meter.window() as w:
        while time.perf_counter() - t0 < meter.min_window_s + 0.2:  # past the minimum window
            cuda_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                min_new_tokens=32, do_sample=False, pad_token_id=0)
    res = w.result
    assert res.energy_j > 0
    assert res.tier == meter.tier and res.tier in ("M1", "M2")
    assert res.duration_s >= meter.min_window_s and "short-window" not in res.flags
    assert "counter-not-monotonic" not in res.flags
    info = meter.device()
    assert info.kind == "cuda" and info.driver and info.power_limit_w and info.power_limit_w > 0
    # Sanity: mean power between 1 W and the board's power limit (+10% for averaging).
    assert 1.0 < res.energy_j / res.duration_s < info.power_limit_w * 1.1


def test_measure_on_gpu_within_cv_bound(meter, cuda_model):
    proto = protocol_preset("cpu", trial_min_s=2.0)  # trials stretch to meter.min_window_s
    m = measure(cuda_model, tiny_tokenizer(), proto, meter)
    assert all(t.energy_j > 0 for t in m.trials)
    assert all(t.duration_s >= meter.min_window_s for t in m.trials)
    assert m.source_tier == meter.tier
    assert m.cv <= proto.cv_max, f"CV {m.cv:.3f} above {proto.cv_max}; other GPU load? flags={m.flags}"
    assert m.device.kind == "cuda" and m.idle_power_w and m.idle_power_w > 0
    assert m.decode_joules_per_token is None or m.decode_joules_per_token > 0
    assert "short-window" not in m.flags
