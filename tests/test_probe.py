"""The kernel probe, the space it narrows, and the deployment dimensions of the search space."""

from __future__ import annotations

import json

import pytest
import torch

import greenopt.search.machine as machine
from greenopt.config import Deploy, SpaceSpec
from greenopt.errors import ConfigError
from greenopt.records import KernelProbe
from greenopt.runtimes.probe import FAST_RATIO, fast_dtypes, probe_kernels
from greenopt.search.space import baseline_params, build, dims, not_sampled, single_moves

BF16 = "matmul bfloat16"


def fixed(ratios: dict[str, float]):
    """A bench that reports ``ratio x 1 ms`` per path (1 ms for those not named)."""
    return lambda fns: {name: 1e-3 * ratios.get(name, 1.0) for name in fns}


def test_probe_reports_ratios_to_fp32_and_marks_fast_paths():
    p = probe_kernels(bench=fixed({BF16: 0.3, "matmul float16": 1.4}))
    by = {t.name: t for t in p.timings}
    assert by["matmul float32"].ratio_to_fp32 == 1.0 and not by["matmul float32"].fast
    assert by[BF16].fast and by[BF16].ratio_to_fp32 == pytest.approx(0.3)
    assert not by["matmul float16"].fast
    assert p.threads == torch.get_num_threads() and p.shape == (576, 1536)
    assert any("(fast)" in line and "bfloat16" in line for line in p.lines())


def test_probe_names_a_kernel_this_torch_lacks(monkeypatch):
    monkeypatch.delattr(torch, "_weight_int4pack_mm_for_cpu", raising=False)
    p = probe_kernels(bench=fixed({}))
    int4 = next(t for t in p.timings if t.name.startswith("int4"))
    assert int4.ratio_to_fp32 is None and "no _weight_int4pack_mm_for_cpu" in int4.note


def test_probe_runs_for_real_in_a_fraction_of_a_second():
    p = probe_kernels(in_features=64, out_features=64, budget_s=0.02)
    assert all(t.seconds_per_call is None or t.seconds_per_call > 0 for t in p.timings)
    assert p.duration_s < 5


def test_bf16_is_kept_for_a_fast_low_bit_kernel_even_when_its_matmul_is_slow():
    int4 = next(n for n in (t.name for t in probe_kernels(bench=fixed({})).timings) if n.startswith("int4"))
    probe = probe_kernels(bench=fixed({BF16: 1.8, int4: 0.7}))
    assert fast_dtypes(probe, ("bfloat16",)) == (("bfloat16",), {})


def test_fast_dtypes_keeps_fast_paths_and_says_why_not():
    fast = probe_kernels(bench=fixed({BF16: 0.5}))
    slow = probe_kernels(bench=fixed({BF16: FAST_RATIO + 0.2, "int8 weight-only (_weight_int8pack_mm, bf16 activations)": 1.2,
                                      "int4 weight-only (_weight_int4pack_mm_for_cpu, group 32, bf16 activations)": 1.1}))
    assert fast_dtypes(fast, ("float32", "bfloat16")) == (("float32", "bfloat16"), {})
    kept, why = fast_dtypes(slow, ("bfloat16",))
    assert kept == () and "1.10x fp32's time" in why["bfloat16"]


# ---------------------------------------------------------------------------- the space on this machine


@pytest.fixture
def probe_calls(monkeypatch):
    calls = []

    def fake_probe(**_):
        calls.append(1)
        return probe_kernels(bench=fixed({BF16: 0.4}))

    monkeypatch.setattr(machine, "probe_kernels", fake_probe)
    return calls


def test_a_cpu_without_bf16_leaves_bf16_out(monkeypatch, tmp_path, probe_calls):
    monkeypatch.setattr("greenopt.runtimes.cpu_has_bf16", lambda flags=None: False)
    space, why = machine.space_for_machine(SpaceSpec(), "cpu", tmp_path / "kernels.json")
    assert space.dtypes == () and "no native kernels" in why["dtype bfloat16"]


def test_a_cpu_with_fast_bf16_keeps_it_and_the_probe_is_kept(monkeypatch, tmp_path, probe_calls):
    monkeypatch.setattr("greenopt.runtimes.cpu_has_bf16", lambda flags=None: True)
    path = tmp_path / "kernels.json"
    space, why = machine.space_for_machine(SpaceSpec(), "cpu", path)
    assert space.dtypes == ("bfloat16",) and why == {}
    assert KernelProbe.model_validate(json.loads(path.read_text()))
    machine.space_for_machine(SpaceSpec(), "cpu", path)  # a resumed run: the stored probe, not a new one
    assert len(probe_calls) == 1


def test_slow_bf16_is_left_out_even_where_the_cpu_has_it(monkeypatch, tmp_path):
    monkeypatch.setattr("greenopt.runtimes.cpu_has_bf16", lambda flags=None: True)
    slow = {BF16: 1.3, "int8 weight-only (_weight_int8pack_mm, bf16 activations)": 1.2,
            "int4 weight-only (_weight_int4pack_mm_for_cpu, group 32, bf16 activations)": 1.1}
    monkeypatch.setattr(machine, "probe_kernels", lambda **_: probe_kernels(bench=fixed(slow)))
    space, why = machine.space_for_machine(SpaceSpec(), "cpu", tmp_path / "k.json")
    assert space.dtypes == () and "1.30x" in why["dtype bfloat16"]


def test_gpus_are_not_probed(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "probe_kernels", lambda **_: pytest.fail("no CPU probe for a GPU run"))
    space, _ = machine.space_for_machine(SpaceSpec(), "cuda:0", tmp_path / "k.json")
    assert space.dtypes == ("bfloat16",)


def test_a_runtime_that_is_not_installed_is_left_out_with_its_extra(monkeypatch, tmp_path):
    def missing(name):
        raise ConfigError(f"runtime {name} is not installed (onnxruntime_genai); pip install 'greenopt[ort]'")

    monkeypatch.setattr(machine, "runtime_class", missing)
    space, why = machine.space_for_machine(SpaceSpec(dtypes=(), runtimes=("onnxruntime-genai",)), "cpu",
                                           tmp_path / "k.json")
    assert space.runtimes == () and "greenopt[ort]" in why["runtime onnxruntime-genai"]


# ---------------------------------------------------------------------------- deployment dimensions


def test_dtype_dimension_builds_a_deployed_variant():
    spec = SpaceSpec(bits=(), prune=(), depth_drop_max=0, ffn_keep_min=1.0)
    assert [d.name for d in dims(spec, 10)] == ["deploy.dtype"]
    assert build(baseline_params(spec, 10), spec, 10).is_baseline
    v = build({"deploy.dtype": "bfloat16"}, spec, 10)
    assert v.deploy == Deploy(dtype="bfloat16") and not v.is_baseline
    assert {"deploy.dtype": "bfloat16"} in [{k: p[k] for k in ("deploy.dtype",)} for p in single_moves(spec, 10)]


def test_onnx_runtime_variants_keep_only_what_it_can_realise():
    spec = SpaceSpec(runtimes=("onnxruntime-genai",), runtime_weights=("dense", "int4"), block_sizes=(32, 128))
    names = [d.name for d in dims(spec, 10)]
    assert {"deploy.runtime", "deploy.weights", "deploy.block_size"} <= set(names)
    params = {**baseline_params(spec, 10), "deploy.runtime": "onnxruntime-genai", "deploy.block_size": 128,
              "bits.g0.ffn": 4, "depth.drop": 1}
    v = build(params, spec, 10)
    assert v.deploy == Deploy(runtime="onnxruntime-genai", weights="int4", block_size=128)
    assert [s.kind for s in v.steps] == ["depth"]  # the int4 quantize step is the runtime's own here
    with_quant = build({**params, "deploy.runtime": "transformers"}, spec, 10)
    assert "quantize" in [s.kind for s in with_quant.steps] and with_quant.deploy.is_reference
    assert "onnxruntime-genai" in not_sampled(spec)[0]
