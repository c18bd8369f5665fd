"""The ONNX Runtime GenAI runtime: builds a tiny llama, matches transformers, caches builds, meters."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

og = pytest.importorskip("onnxruntime_genai")

from greenopt.compress import apply
from greenopt.config import Deploy, DepthStep, QuantizeStep, Variant, protocol_preset
from greenopt.errors import ConfigError
from greenopt.measure.workload import measure
from greenopt.runtimes import (
    TransformersRuntime,
    ortgenai,
    realise,
    runtime_class,
)
from greenopt.runtimes.ortgenai import OrtGenAIRuntime
from greenopt.testing import FakeMeter, tiny_llama, tiny_tokenizer

ORT = "onnxruntime-genai"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """GREENOPT_HOME in a temp folder, so builds never touch the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("home")
        mp.setenv("GREENOPT_HOME", str(home))
        yield home / "runtimes" / ORT


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), tiny_tokenizer()


@pytest.fixture(scope="module")
def fp32(cache, tiny):
    return OrtGenAIRuntime.build(*tiny, Deploy(runtime=ORT))


def _prompts(batch=2, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (batch, tokens), generator=g)


def _sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


def test_fp32_generates_the_same_greedy_tokens_as_transformers(tiny, fp32):
    ids = _prompts()
    out = fp32.generate(ids, 6)
    assert out.shape == (2, 6) and out.dtype == torch.int64
    assert torch.equal(out, TransformersRuntime(*tiny).generate(ids, 6))


def test_fp32_logits_match_transformers_at_every_position(tiny, fp32):
    ids = _prompts(batch=3, tokens=9)
    got = fp32.logits(ids)
    with torch.inference_mode():
        want = TransformersRuntime(*tiny).logits(ids)
    assert got.shape == want.shape == (3, 9, len(tiny[1])) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_eos_never_ends_a_row_early(cache):
    """EOS (id 0) is every position's argmax, yet each row gets exactly new_tokens, as in transformers."""
    model, tok = tiny_llama(seed=3), tiny_tokenizer()
    ids = _prompts()
    with torch.no_grad():
        h = model.model(ids).last_hidden_state.mean((0, 1))
        model.lm_head.weight[0] = h / h.norm() * 50  # tied: also the embedding of id 0, never in the prompts
        assert (model(ids).logits.argmax(-1) == 0).all()
    rt = OrtGenAIRuntime.build(model, tok, Deploy(runtime=ORT))
    out = rt.generate(ids, 5)
    assert out.shape == (2, 5) and not (out == 0).any()
    assert torch.equal(out, TransformersRuntime(model, tok).generate(ids, 5))


def test_describe_and_threads_follow_torch(fp32, monkeypatch):
    overlays = []

    class Recording(og.Config):
        def overlay(self, text):
            overlays.append(json.loads(text))
            super().overlay(text)

    monkeypatch.setattr(og, "Config", Recording)
    d = fp32.describe()
    assert (d.name, d.version, d.dtype, d.device) == (ORT, og.__version__, "float32", "cpu")
    assert d.kernels and d.kernels[0].startswith("MatMul float32 x")
    assert d.options["weights"] == "dense" and "onnxruntime" in d.libraries
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fp32.generate(_prompts(), 1)
        assert fp32.describe().threads == 2  # the session was rebuilt with 2 intra-op threads
        assert overlays[-1] == {"model": {"decoder": {"session_options": {"intra_op_num_threads": 2}}}}
    finally:
        torch.set_num_threads(before)
    fp32.generate(_prompts(), 1)
    assert overlays[-1]["model"]["decoder"]["session_options"]["intra_op_num_threads"] == before


def test_int4_build_runs_names_matmulnbits_and_stays_close(cache, tiny, fp32):
    rt = realise(*tiny, Deploy(runtime=ORT, weights="int4"))
    assert isinstance(rt, OrtGenAIRuntime)
    d = rt.describe()
    assert d.kernels[0].startswith("MatMulNBits int4 block 32 accuracy_level 4 x"), d.kernels
    assert d.options == {"weights": "int4", "execution_provider": "cpu", "block_size": "32", "accuracy_level": "4"}
    assert rt.generate(_prompts(), 4).shape == (2, 4)
    ids = _prompts(tokens=12)
    # Round-to-nearest int4 (block 32) of this random tiny model, simulated in torch, gives 7.8 dB;
    # weights in the wrong layout or order give about 0 dB or less.
    assert _sqnr_db(fp32.logits(ids), rt.logits(ids)) > 5


def test_int8_and_block_size_are_built_as_asked(cache, tiny, fp32):
    ids = _prompts(tokens=12)
    ref = fp32.logits(ids)
    int4 = OrtGenAIRuntime.build(*tiny, Deploy(runtime=ORT, weights="int4", block_size=16, accuracy_level=0))
    int8 = OrtGenAIRuntime.build(*tiny, Deploy(runtime=ORT, weights="int8", block_size=16, accuracy_level=0))
    assert int4.describe().kernels[0].startswith("MatMulNBits int4 block 16 accuracy_level 0 x")
    assert int8.describe().kernels[0].startswith("MatMulNBits int8 block 16 accuracy_level 0 x")
    assert _sqnr_db(ref, int8.logits(ids)) > _sqnr_db(ref, int4.logits(ids)) + 10  # 4 more bits: ~24 dB


def test_a_depth_pruned_checkpoint_builds_as_changed(cache):
    model, tok = tiny_llama(layers=3), tiny_tokenizer()
    variant = Variant(steps=(DepthStep(layers="1"),), deploy=Deploy(runtime=ORT))
    apply(model, variant, tokenizer=tok)
    assert model.config.num_hidden_layers == 2
    rt = realise(model, tok, variant.deploy, steps=variant.steps)
    ids = _prompts()
    assert torch.equal(rt.generate(ids, 3), TransformersRuntime(model, tok).generate(ids, 3))


def test_realise_refuses_a_quantize_step(tiny):
    with pytest.raises(ConfigError, match="cannot realise a quantize step"):
        realise(*tiny, Deploy(runtime=ORT), steps=(QuantizeStep(),))


def test_cpu_build_refuses_half_dtypes_and_cuda_without_its_provider(tiny, monkeypatch):
    with pytest.raises(ConfigError, match="dtype bfloat16 is for CUDA"):
        OrtGenAIRuntime.build(*tiny, Deploy(runtime=ORT, dtype="bfloat16"))
    monkeypatch.setattr(og, "is_cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="onnxruntime-genai-cuda"):
        ortgenai._builder_options(Deploy(runtime=ORT), torch.float16, "cuda:0")
    monkeypatch.setattr(og, "is_cuda_available", lambda: True)
    assert ortgenai._builder_options(Deploy(runtime=ORT, weights="int4", dtype="bfloat16"), torch.float32,
                                     "cuda:0") == ("int4", "cuda", ["block_size=32", "accuracy_level=4",
                                                                    "use_cuda_bf16=true"])
    with pytest.raises(ConfigError, match="compute in float16"):
        ortgenai._builder_options(Deploy(runtime=ORT, weights="int8"), torch.float32, "cuda:0")


def test_missing_package_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import onnxruntime_genai -> ImportError
    monkeypatch.delitem(sys.modules, "greenopt.runtimes.ortgenai")
    with pytest.raises(ConfigError, match=r"runtime onnxruntime-genai is not installed .*greenopt\[ort\]"):
        runtime_class(ORT)
    with pytest.raises(ConfigError, match=r"greenopt\[ort\]"):
        realise(*tiny, Deploy(runtime=ORT))


def test_second_build_is_a_cache_hit_and_a_failed_build_leaves_nothing(cache, tiny, fp32, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the builder ran on a cache hit")

    monkeypatch.setattr(ortgenai, "_build_into", no_build)
    stale = cache / f"{ortgenai._STAGING}killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    again = OrtGenAIRuntime.build(*tiny, Deploy(runtime=ORT))
    assert again.folder == fp32.folder and not stale.exists()  # the killed build's leftovers are swept
    entries = set(cache.iterdir())

    def half_build(hf, out, *args, **kwargs):
        out.mkdir()
        (out / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ortgenai, "_build_into", half_build)
    with pytest.raises(KeyboardInterrupt):
        OrtGenAIRuntime.build(tiny_llama(seed=5), tiny[1], Deploy(runtime=ORT))
    assert set(cache.iterdir()) == entries  # no new entry, no staging folder


def test_export_loads_in_onnxruntime_genai(fp32, tmp_path):
    names = fp32.export(tmp_path)
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(names)
    assert ortgenai.BUILD_FILE not in names
    params = og.GeneratorParams(model := og.Model(str(tmp_path)))
    params.set_search_options(do_sample=False, max_length=10, min_length=10)
    gen = og.Generator(model, params)
    ids = _prompts(batch=1)
    gen.append_tokens(ids.numpy().astype("int32"))
    while not gen.is_done():
        gen.generate_next_token()
    assert list(gen.get_sequence(0)[7:]) == fp32.generate(ids, 3)[0].tolist()


def test_measure_runs_the_workload_on_the_runtime(tiny, fp32):
    m = measure(fp32, tiny[1], protocol_preset("smoke"), FakeMeter())
    assert len(m.trials) >= 5 and all(t.generated_tokens > 0 for t in m.trials)


@pytest.mark.integration
def test_default_model_int4_generates_and_agrees_with_transformers(tmp_path, monkeypatch):
    """SmolLM2-135M as int4 (block 32, int8 activations) against float32 transformers: top-1
    agreement on the first 128 tokens of the GO-1 prompt text above 0.5 (measured 0.73; plain
    round-to-nearest int4 of this small model is lossy: simulated in torch it keeps 0.53-0.68 of
    the argmaxes on other texts). The float32 build agrees on all of them; a broken build, wrong
    weights or shifted positions on almost none."""
    from greenopt.measure.workload import prompt_texts
    from greenopt.models import load_model

    monkeypatch.setenv("GREENOPT_HOME", str(tmp_path))
    model, tok, _ = load_model("default", dtype="float32", device="cpu")
    start = time.perf_counter()
    rt = realise(model, tok, Deploy(runtime=ORT, weights="int4"))
    build_s = time.perf_counter() - start
    ids = tok("\n".join(prompt_texts()[:4]), return_tensors="pt")["input_ids"][:, :128]
    assert ids.shape == (1, 128)
    start = time.perf_counter()
    out = rt.generate(ids[:, :16], 8)
    gen_s = time.perf_counter() - start
    assert out.shape == (1, 8)
    with torch.inference_mode():
        want = TransformersRuntime(model, tok).logits(ids)
    agree = float((rt.logits(ids).argmax(-1) == want.argmax(-1)).float().mean())
    print(f"int4 build {build_s:.1f} s, 8 tokens in {gen_s:.2f} s, top-1 agreement {agree:.3f}")
    assert agree > 0.5, agree


def test_deploy_reports_the_built_artifacts_weight_bytes(cache):
    from greenopt.runtimes import deploy

    rt, report = deploy(tiny_llama(), tiny_tokenizer(), Variant(deploy=Deploy(runtime=ORT, weights="int4")))
    assert report.weight_bytes_after == rt.weight_bytes() < report.weight_bytes_before  # the int4 graph, not torch's
