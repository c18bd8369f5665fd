"""NVML energy counter around real generation on a CUDA GPU (skipped without CUDA)."""

from __future__ import annotations

import time

import pytest
import torch

from greenopt.config import protocol_preset
from greenopt.measure.nvml import NvmlMeter
from greenopt.measure.workload import load_prompts, measure
from greenopt.testing import tiny_llama, tiny_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def cuda_model():
    return tiny_llama().cuda()


def test_counter_reads_energy_around_generation(cuda_model):
    meter = NvmlMeter()
    ids = load_prompts(tiny_tokenizer(), protocol_preset("cpu"))[:4].cuda()
    t0 = time.perf_counter()
    with torch.inference_mode(), meter.window() as w:
        while time.perf_counter() - t0 < 1.5:  # past the 1 s minimum window
            cuda_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                min_new_tokens=32, do_sample=False, pad_token_id=0)
    res = w.result
    assert res.energy_j > 0
    assert res.tier == meter.tier and res.tier in ("M1", "M2")
    assert res.duration_s >= 1.0 and "short-window" not in res.flags
    assert "counter-not-monotonic" not in res.flags
    info = meter.device()
    assert info.kind == "cuda" and info.driver and info.power_limit_w and info.power_limit_w > 0
    # Sanity: mean power between 1 W and the board's power limit (+10% for averaging).
    assert 1.0 < res.energy_j / res.duration_s < info.power_limit_w * 1.1


def test_measure_on_gpu_within_cv_bound(cuda_model):
    meter = NvmlMeter()
    proto = protocol_preset("cpu", trial_min_s=2.0)
    m = measure(cuda_model, tiny_tokenizer(), proto, meter)
    assert all(t.energy_j > 0 for t in m.trials)
    assert m.source_tier == meter.tier
    assert m.cv <= proto.cv_max, f"CV {m.cv:.3f} above {proto.cv_max}; other GPU load? flags={m.flags}"
    assert m.device.kind == "cuda" and m.idle_power_w and m.idle_power_w > 0
    assert m.decode_joules_per_token is None or m.decode_joules_per_token > 0

