"""The transformers runtime's compiled mode: static KV cache + torch.compile of the decode step."""

from __future__ import annotations

import pytest
import torch

from greenopt.config import Deploy, Variant
from greenopt.runtimes import TransformersRuntime, deploy, realise
from greenopt.testing import tiny_llama, tiny_tokenizer


def test_compiled_mode_asks_transformers_for_a_static_cache_and_compiles_on_cpu_too(monkeypatch):
    rt = TransformersRuntime(tiny_llama(), tiny_tokenizer(), compiled=True)
    seen = {}

    def fake_generate(input_ids, attention_mask, generation_config):
        seen["config"] = generation_config
        return torch.cat([input_ids, torch.ones(input_ids.shape[0], generation_config.max_new_tokens,
                                                dtype=input_ids.dtype)], 1)

    monkeypatch.setattr(rt.module, "generate", fake_generate)
    out = rt.generate(torch.ones(2, 5, dtype=torch.long), 3)
    assert out.shape == (2, 3)
    config = seen["config"]
    assert config.cache_implementation == "static" and config.compile_config._compile_all_devices
    assert config.compile_config.mode == "default" and config.compile_config.dynamic is False
    assert list(rt.compile_s) == [(2, 5, 3)]  # the first call of a shape is kept apart
    rt.generate(torch.ones(2, 5, dtype=torch.long), 3)
    assert list(rt.compile_s) == [(2, 5, 3)]
    options = rt.describe().options
    assert "static KV cache" in options["compiled"] and "2x5x3" in options["compile_s"]


def test_an_eager_runtime_says_nothing_of_compiling():
    rt = TransformersRuntime(tiny_llama(), tiny_tokenizer())
    assert "compiled" not in rt.describe().options and rt.compile_s == {}


def test_compile_is_a_transformers_deployment_and_part_of_the_variant():
    assert Deploy(compile=True).describe() == "transformers compiled"
    assert Deploy(dtype="bfloat16", compile=True).describe() == "transformers bfloat16 compiled"
    assert not Deploy(compile=True).is_reference
    with pytest.raises(ValueError, match="compile"):
        Deploy(runtime="onnxruntime-genai", compile=True)
    plain, compiled = Variant(), Variant(deploy=Deploy(compile=True))
    assert plain.hash != compiled.hash
    ort = Variant(deploy=Deploy(runtime="onnxruntime-genai", weights="int4"))
    assert ort.hash == "58e5e27a8e47"  # as before compile existed


def test_realise_and_deploy_give_a_compiled_runtime():
    rt = realise(tiny_llama(), tiny_tokenizer(), Deploy(compile=True))
    assert isinstance(rt, TransformersRuntime) and rt.compiled
    rt2, _ = deploy(tiny_llama(), tiny_tokenizer(), Variant(deploy=Deploy(compile=True)))
    assert rt2.compiled


@pytest.mark.integration  # compiles with inductor: ~40 s on 2 cores
def test_compiled_generation_equals_eager_greedy_and_times_the_compile_apart():
    model, tok = tiny_llama(), tiny_tokenizer()
    ids = torch.randint(5, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    eager = TransformersRuntime(model, tok).generate(ids, 12)
    rt = TransformersRuntime(model, tok, compiled=True)
    first = rt.generate(ids, 12)
    again = rt.generate(ids, 12)
    assert torch.equal(first, eager) and torch.equal(again, eager)
    assert rt.compile_s[(1, 24, 12)] > 0


def test_compile_without_a_cpp_compiler_is_refused_in_one_line(monkeypatch):
    import greenopt.runtimes as rts

    monkeypatch.setattr(rts.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    reason = rts.unrealisable(Deploy(compile=True), (), "cpu")
    assert reason and "C++ compiler" in reason and "apt-get install g++" in reason
    assert rts.unrealisable(Deploy(compile=True), (), "cuda:0") is None  # the GPU path is triton's, not checked here
    monkeypatch.setattr(rts.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert rts.unrealisable(Deploy(compile=True), (), "cpu") is None


def test_the_space_samples_compile_and_llama_cpp_formats():
    from greenopt.config import SpaceSpec
    from greenopt.search import space as sp

    spec = SpaceSpec(bits=(16,), prune=(), depth_drop_max=0.0, ffn_keep_min=1.0, dtypes=(), compile=(False, True),
                     runtimes=("llama.cpp",), llamacpp_weights=("q8_0", "q4_k_m"))
    names = {d.name for d in sp.dims(spec, 4)}
    assert {"deploy.compile", "deploy.runtime", "deploy.llamacpp_weights"} <= names
    assert "deploy.weights" not in names  # onnxruntime-genai's formats only when it is in the space
    moves = [sp.build(m, spec, 4) for m in sp.single_moves(spec, 4)]
    assert Deploy(compile=True) in [v.deploy for v in moves]
    assert Deploy(runtime="llama.cpp", weights="q8_0") in [v.deploy for v in moves]
    built = sp.build({"deploy.runtime": "llama.cpp", "deploy.llamacpp_weights": "q4_k_m"}, spec, 4)
    assert built.deploy == Deploy(runtime="llama.cpp", weights="q4_k_m")
    assert sp.baseline_params(spec, 4)["deploy.compile"] is False
    assert sp.build(sp.baseline_params(spec, 4), spec, 4).is_baseline
    assert any("llama.cpp: quantize and MoE moves are not sampled" in n and "q8_0/q4_k_m" in n
               for n in sp.not_sampled(spec))
