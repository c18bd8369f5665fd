"""The llama.cpp runtime: GGUF written from a tiny llama, the registry, what it cannot realise, and
(with llama-cpp-python installed) builds that match transformers, quantize, export and reload.

The unit tests run without the extra: a fake ``llama_cpp`` module stands in for llama-cpp-python.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
import time
import types
from typing import ClassVar

import numpy as np
import pytest
import torch

from greenopt.compress import apply
from greenopt.config import (
    Deploy,
    DepthStep,
    QuantizeStep,
    Variant,
    WidthStep,
    validated,
)
from greenopt.errors import ConfigError, ModelError
from greenopt.models import gguf as gguf_io
from greenopt.runtimes import (
    RUNTIMES,
    deploy,
    load_artifact,
    realise,
    runtime_class,
    unrealisable,
)
from greenopt.testing import tiny_llama, tiny_mixtral, tiny_tokenizer

LCPP = "llama.cpp"
AVX2 = ("avx2", "fma", "f16c")
AVX512_BF16 = (*AVX2, "avx512f", "avx512_bf16")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """GREENOPT_HOME in a temp folder, so builds never touch the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("home")
        mp.setenv("GREENOPT_HOME", str(home))
        yield home


def _prompts(batch=2, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (batch, tokens), generator=g)


def _sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


# ---------------------------------------------------------------------------- GGUF writer (gguf package only)


def _read(path):
    import gguf

    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def test_gguf_holds_the_llama_hyperparameters_vocab_and_tied_head(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    gguf_io.write(model, tok, tmp_path / "m.gguf")
    kv, tensors = _read(tmp_path / "m.gguf")
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 4
    assert (kv["llama.embedding_length"], kv["llama.feed_forward_length"]) == (64, 128)
    assert (kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]) == (4, 2)
    assert kv["llama.rope.dimension_count"] == 16 and kv["llama.context_length"] == 512
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert kv["tokenizer.ggml.token_type"][0] == 3  # <|endoftext|>: a control token
    assert len(kv["tokenizer.ggml.merges"]) > 0 and kv["tokenizer.ggml.eos_token_id"] == 0
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd for the output
    assert len(tensors) == 2 + 9 * 4 and all(t.tensor_type.name == "F32" for t in tensors.values())


def test_gguf_q_and_k_rows_are_permuted_to_ggml_rope_order_and_back(tmp_path):
    model, tok = tiny_llama(tie_embeddings=False), tiny_tokenizer()
    gguf_io.write(model, tok, tmp_path / "m.gguf", "float16")
    _, tensors = _read(tmp_path / "m.gguf")
    attn = model.model.layers[1].self_attn
    for name, w, heads in (("attn_q", attn.q_proj.weight, 4), ("attn_k", attn.k_proj.weight, 2)):
        t = tensors[f"blk.1.{name}.weight"]
        got = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(w.shape)
        assert t.tensor_type.name == "F16"
        back = got.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        torch.testing.assert_close(back, w.detach(), atol=2e-3, rtol=1e-3)  # float16 storage
        assert not torch.allclose(got, w.detach(), atol=1e-2)  # the rows did move
    assert tensors["output.weight"].tensor_type.name == "F16" and tensors["output_norm.weight"].tensor_type.name == "F32"


def test_gguf_pre_tokenizers_map_to_llama_cpp_names():
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_io._LLAMA3_RE}}, {"type": "ByteLevel", "use_regex": False}]}
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    grouped = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                     {"type": "ByteLevel", "use_regex": True}]}
    names = {k: gguf_io._PRE_TOKENIZERS.get(gguf_io._pre_shape(v)) for k, v in
             (("llama3", llama3), ("smollm", smollm), ("grouped", grouped), ("none", {}))}
    assert names == {"llama3": "llama-bpe", "smollm": "smollm", "grouped": None, "none": None}


def test_gguf_refuses_what_llama_cpp_llama_cannot_load(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ModelError, match="not architecture mixtral"):
        gguf_io.write(tiny_mixtral(), tok, tmp_path / "a.gguf")
    model = tiny_llama()
    apply(model, Variant(steps=(WidthStep(ffn_keep=0.5, layers="0-1"),)), tokenizer=tok)
    with pytest.raises(ModelError, match="layers differ in FFN width"):
        gguf_io.write(model, tok, tmp_path / "b.gguf")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelError, match="byte-level BPE tokenizers.*WordLevel"):
        gguf_io.write(tiny_llama(), PreTrainedTokenizerFast(tokenizer_object=word), tmp_path / "c.gguf")
    with pytest.raises(ModelError, match="float32, float16, bfloat16, not int8"):
        gguf_io.write(tiny_llama(), tok, tmp_path / "d.gguf", "int8")
    assert not list(tmp_path.glob("[bcd].gguf"))


# ---------------------------------------------------------------------------- config, registry, refusals


def test_deploy_takes_llama_cpp_types_and_keeps_existing_hashes():
    d = Deploy(runtime=LCPP, weights="q4_k_m")
    assert d.describe() == "llama.cpp q4_k_m" and Deploy(runtime=LCPP, dtype="float16").describe() == "llama.cpp float16"
    # the hashes of variants recorded before llama.cpp existed
    assert Variant(deploy=Deploy(runtime="onnxruntime-genai", weights="int4")).hash == "58e5e27a8e47"
    assert Variant(steps=(DepthStep(drop=2),), deploy=Deploy(runtime="onnxruntime-genai", weights="int8",
                                                             block_size=64)).hash == "dd43dd623774"
    assert Variant(deploy=Deploy(dtype="bfloat16")).hash == "b8c573456a30" and Variant().hash == "4f53cda18c2b"
    for bad, why in (({"runtime": LCPP, "weights": "int4"}, "int4 is onnxruntime-genai's format; llama.cpp takes"),
                     ({"runtime": "onnxruntime-genai", "weights": "q8_0"}, "q8_0 is llama.cpp's format"),
                     ({"weights": "q4_k_m"}, "q4_k_m is the llama.cpp format"),
                     ({"runtime": LCPP, "block_size": 64}, "block_size and accuracy_level are onnxruntime-genai"),
                     ({"runtime": LCPP, "weights": "q8_0", "dtype": "float16"}, "quantizes q8_0 from float32"),
                     ({"runtime": LCPP, "weights": "q9_k"}, "Input should be 'dense'")):
        with pytest.raises(ConfigError, match=why):
            validated(Deploy, bad, where="deploy")


def test_the_registry_names_llama_cpp_lazily():
    assert RUNTIMES[LCPP] == "greenopt.runtimes.llamacpp:LlamaCppRuntime"


def test_unrealisable_names_the_move_and_llama_cpp():
    from greenopt.config import ExpertPruneStep, HealStep, MoefyStep, PruneStep

    d = Deploy(runtime=LCPP, weights="q4_k_m")
    for step, words in ((QuantizeStep(), "cannot realise a quantize step (greenopt's own packed weights"),
                        (MoefyStep(), "cannot realise a moefy step (MoE-split FFNs"),
                        (ExpertPruneStep(keep=0.5), "cannot realise a expert_prune step (MoE-split FFNs"),
                        (WidthStep(ffn_keep=0.5, layers="0-3"), "width step on layers 0-3")):
        reason = unrealisable(d, (DepthStep(drop=1), step), "cpu", AVX2)
        assert reason.startswith("llama.cpp ") and words in reason and "\n" not in reason
    plain = (DepthStep(drop=1), WidthStep(ffn_keep=0.5), PruneStep(), HealStep())
    assert unrealisable(d, plain, "cpu", AVX2) is None
    assert "no native kernels" in unrealisable(Deploy(runtime=LCPP, dtype="bfloat16"), (), "cpu", AVX2)
    assert unrealisable(Deploy(runtime=LCPP, dtype="bfloat16"), (), "cpu", AVX512_BF16) is None
    assert unrealisable(Deploy(runtime=LCPP, dtype="float16"), (), "cpu", AVX2) is None  # F16C conversions
    assert "--device cpu" in unrealisable(d, (), "cuda:0", AVX512_BF16)
    with pytest.raises(ConfigError, match="cannot realise a quantize step"):
        realise(tiny_llama(), tiny_tokenizer(), d, steps=(QuantizeStep(),))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="cannot realise a quantize step"):  # refused before the step runs
        deploy(model, tiny_tokenizer(), Variant(steps=(QuantizeStep(method="rtn"),), deploy=d))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_package_names_the_extra_and_the_make_target(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    _forget_llamacpp(monkeypatch)
    with pytest.raises(ConfigError, match=r"runtime llama.cpp is not installed .*greenopt\[llamacpp\].*make llamacpp"):
        runtime_class(LCPP)
    with pytest.raises(ConfigError, match=r"greenopt\[llamacpp\]"):
        realise(tiny_llama(), tiny_tokenizer(), Deploy(runtime=LCPP))


# ---------------------------------------------------------------------------- with a fake llama_cpp


class _FakeLlama:
    """Records how the runtime drives ``llama_cpp.Llama``; every token it 'generates' is EOS (0)."""

    made: ClassVar[list[dict]] = []

    def __init__(self, model_path, **kw):
        self.kw, self.resets, self.evals, self.prompts = kw, 0, [], []
        _FakeLlama.made.append(kw)

    def n_ctx(self):
        return self.kw["n_ctx"]

    def n_vocab(self):
        return 5

    def reset(self):
        self.resets += 1

    def eval(self, tokens):
        self.evals.append(list(tokens))
        self.scores = np.tile(np.arange(5, dtype=np.float32), (self.n_ctx(), 1)) + len(tokens)

    def generate(self, tokens, **kw):
        assert kw == {"top_k": 1, "temp": 0.0, "repeat_penalty": 1.0, "reset": True}
        self.prompts.append((list(tokens), self.resets))
        while True:
            yield 0

    def close(self):
        self.closed = True


class _QuantizeParams(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int)]


@pytest.fixture
def fake(monkeypatch, home):
    """llama_cpp replaced by a fake (quantize copies the file), greenopt.runtimes.llamacpp imported against it."""
    mod = types.ModuleType("llama_cpp")
    mod.__version__ = "0.0-fake"
    mod.info = b"CPU : SSE3 = 1 | AVX2 = 1 | F16C = 1 | AVX512 = 0 | AMX_INT8 = 0 | OPENMP = 1 |"
    mod.llama_print_system_info = lambda: mod.info
    mod.LLAMA_FTYPE_MOSTLY_Q8_0, mod.LLAMA_FTYPE_MOSTLY_Q4_K_M = 7, 15
    mod.quantized = []

    def quantize(src, dst, params):
        mod.quantized.append(params._obj.ftype)  # params: ctypes.byref(struct)
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
        return 0

    mod.llama_model_quantize = quantize
    mod.llama_model_quantize_default_params = _QuantizeParams
    mod.llama_ftype_name = lambda ftype: {0: b"all F32", 7: b"Q8_0"}.get(ftype, b"?")
    mod.Llama = _FakeLlama
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    _forget_llamacpp(monkeypatch)
    _FakeLlama.made = []
    yield mod
    sys.modules.pop("greenopt.runtimes.llamacpp", None)  # the next import sees the real (or no) llama_cpp


def _forget_llamacpp(monkeypatch) -> None:
    """The next import of greenopt.runtimes.llamacpp runs again, against whatever llama_cpp is now."""
    import greenopt.runtimes

    monkeypatch.delitem(sys.modules, "greenopt.runtimes.llamacpp", raising=False)
    monkeypatch.delattr(greenopt.runtimes, "llamacpp", raising=False)


def _llamacpp():
    return importlib.import_module("greenopt.runtimes.llamacpp")


def test_describe_names_version_build_flags_weights_and_threads(fake):
    rt = realise(tiny_llama(), tiny_tokenizer(), Deploy(runtime=LCPP, weights="q8_0"))
    assert type(rt).__name__ == "LlamaCppRuntime" and fake.quantized == [7]
    d = rt.describe()
    assert (d.name, d.version, d.dtype, d.device, d.threads) == (LCPP, "0.0-fake", "float32", "cpu",
                                                                 torch.get_num_threads())
    assert d.options["weights"] == "q8_0" and d.options["build"] == "SSE3 AVX2 F16C OPENMP"
    assert d.options["kv_cache"] == "f16" and "gguf" in d.libraries
    assert d.kernels == ("F32 x29",)  # the fake quantizer copies: 7 matmuls x 4 layers and the tied embedding/output
    assert d.line().startswith("llama.cpp 0.0-fake, float32 on cpu")
    assert rt.max_length == 512 and rt.weight_bytes() > 0


def test_generate_is_exact_length_from_an_empty_cache_and_eos_does_not_stop_it(fake):
    rt = realise(tiny_llama(), tiny_tokenizer(), Deploy(runtime=LCPP))
    ids = _prompts(batch=3, tokens=7)
    out = rt.generate(ids, 6)
    assert out.shape == (3, 6) and out.dtype == torch.int64 and (out == 0).all()  # EOS six times per row
    llm = rt._contexts[False][0]
    assert [p for p, _ in llm.prompts] == ids.tolist()
    assert [r for _, r in llm.prompts] == [1, 2, 3]  # reset before every row: no prefix reuse
    assert _FakeLlama.made[-1]["logits_all"] is False and _FakeLlama.made[-1]["n_ctx"] == 256
    assert _FakeLlama.made[-1]["n_gpu_layers"] == 0


def test_logits_score_every_position_in_their_own_context_sized_to_the_call(fake):
    rt = realise(tiny_llama(), tiny_tokenizer(), Deploy(runtime=LCPP))
    got = rt.logits(_prompts(batch=2, tokens=9))
    assert got.shape == (2, 9, 5) and got.dtype == torch.float32 and float(got[0, 0, 0]) == 9
    assert _FakeLlama.made[-1]["logits_all"] is True
    rt.logits(_prompts(batch=1, tokens=300))
    assert _FakeLlama.made[-1]["n_ctx"] == 512 and len(_FakeLlama.made) == 2  # a longer call: a larger context
    rt.logits(_prompts(batch=1, tokens=20))
    assert len(_FakeLlama.made) == 2  # a shorter one reuses it


def test_a_thread_change_reloads_the_model_with_that_many_threads(fake):
    rt = realise(tiny_llama(), tiny_tokenizer(), Deploy(runtime=LCPP))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rt.generate(_prompts(), 1)
        assert (_FakeLlama.made[-1]["n_threads"], _FakeLlama.made[-1]["n_threads_batch"]) == (2, 2)
        assert rt.describe().threads == 2
    finally:
        torch.set_num_threads(before)
    rt.generate(_prompts(), 1)
    assert len(_FakeLlama.made) == 2 and _FakeLlama.made[-1]["n_threads"] == before


def test_quantized_weights_are_refused_on_a_build_with_the_amx_backend(fake):
    fake.info = b"CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 |"
    with pytest.raises(ConfigError, match="AMX backend.*make llamacpp"):
        realise(tiny_llama(), tiny_tokenizer(), Deploy(runtime=LCPP, weights="q4_k_m"))
    assert fake.quantized == []
    assert realise(tiny_llama(), tiny_tokenizer(), Deploy(runtime=LCPP)).describe().options["build"] == "AVX2 AVX512 AMX_INT8"


def test_second_build_is_a_cache_hit_and_a_killed_build_is_swept(fake, home):
    llamacpp = _llamacpp()
    first = llamacpp.LlamaCppRuntime.build(tiny_llama(seed=7), tiny_tokenizer(), Deploy(runtime=LCPP, weights="q8_0"))
    root = home / "runtimes" / LCPP
    stale = root / f"{llamacpp._STAGING}killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    again = llamacpp.LlamaCppRuntime.build(tiny_llama(seed=7), tiny_tokenizer(), Deploy(runtime=LCPP, weights="q8_0"))
    assert again.folder == first.folder and fake.quantized == [7] and not stale.exists()
    assert json.loads((first.folder / llamacpp.BUILD_FILE).read_text())["file_type"] == "all F32"
    entries = set(root.iterdir())

    def killed(*a):
        raise KeyboardInterrupt

    fake.llama_model_quantize = killed
    with pytest.raises(KeyboardInterrupt):
        llamacpp.LlamaCppRuntime.build(tiny_llama(seed=8), tiny_tokenizer(), Deploy(runtime=LCPP, weights="q8_0"))
    assert set(root.iterdir()) == entries  # no new entry, no staging folder


def test_a_failed_quantization_is_one_model_error(fake):
    fake.llama_model_quantize = lambda *a: 1
    with pytest.raises(ModelError, match=r"could not quantize the model to q4_k_m \(llama_model_quantize returned 1\)"):
        realise(tiny_llama(seed=9), tiny_tokenizer(), Deploy(runtime=LCPP, weights="q4_k_m"))


# ---------------------------------------------------------------------------- real llama-cpp-python


@pytest.fixture(scope="module")
def real(home):
    pytest.importorskip("llama_cpp")
    with pytest.MonkeyPatch.context() as mp:
        _forget_llamacpp(mp)  # a fake may have been imported before
        yield _llamacpp()


@pytest.fixture(scope="module")
def tiny256():
    """Rows of 256 columns: llama.cpp's K-quants (q4_k_m) take whole 256-value blocks, else fall back."""
    return tiny_llama(hidden=256, intermediate=512), tiny_tokenizer()


@pytest.fixture(scope="module")
def f32(real, tiny256):
    return real.LlamaCppRuntime.build(*tiny256, Deploy(runtime=LCPP))


def _hf_logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


def test_real_f32_and_f16_logits_match_transformers(real, tiny256, f32):
    ids = _prompts(batch=2, tokens=12)
    want = _hf_logits(tiny256[0], ids)
    got = f32.logits(ids)
    assert got.shape == want.shape == (2, 12, len(tiny256[1])) and got.dtype == torch.float32
    assert _sqnr_db(want, got) > 50  # f16 KV cache, as deployed; a layout error reads ~0 dB
    f16 = real.LlamaCppRuntime.build(*tiny256, Deploy(runtime=LCPP, dtype="float16"))
    assert f16.describe().dtype == "float16" and f16.describe().kernels == ("F16 x29",)
    assert _sqnr_db(want, f16.logits(ids)) > 40
    assert f16.weight_bytes() < 0.6 * f32.weight_bytes()


def test_real_generate_is_exact_length_and_greedy(real, tiny256, f32):
    ids = _prompts(batch=2, tokens=7)
    out = f32.generate(ids, 9)
    assert out.shape == (2, 9) and out.dtype == torch.int64
    assert torch.equal(out[:, 0], f32.logits(ids)[:, -1].argmax(-1))  # greedy: the prefill's argmax
    assert torch.equal(f32.generate(ids, 9), out)  # a repeated prompt runs again from an empty cache


def test_real_eos_never_ends_a_row_early(real):
    """EOS (id 0) is every position's argmax, yet each row gets exactly new_tokens."""
    model, tok = tiny_llama(seed=3), tiny_tokenizer()
    ids = _prompts()
    with torch.no_grad():
        h = model.model(ids).last_hidden_state.mean((0, 1))
        model.lm_head.weight[0] = h / h.norm() * 50
    rt = real.LlamaCppRuntime.build(model, tok, Deploy(runtime=LCPP))
    out = rt.generate(ids, 5)
    assert out.shape == (2, 5)
    assert (rt.logits(torch.cat([ids, out], 1))[:, ids.shape[1] - 1:-1].argmax(-1) == out).all()


def test_real_q8_0_and_q4_k_m_are_quantized_by_llama_cpp_and_stay_close(real, tiny256, f32):
    if "AMX_INT8" in real.system_flags().split():
        pytest.skip("this llama-cpp-python build has llama.cpp's AMX backend (refused for quantized weights)")
    ids = _prompts(batch=2, tokens=12)
    ref = f32.logits(ids)
    q8 = realise(*tiny256, Deploy(runtime=LCPP, weights="q8_0"))
    q4 = realise(*tiny256, Deploy(runtime=LCPP, weights="q4_k_m"))
    assert q8.describe().options["file_type"] == "Q8_0" and q8.describe().kernels == ("Q8_0 x29",)
    assert "Q4_K" in " ".join(q4.describe().kernels) and q4.describe().options["file_type"].startswith("Q4_K")
    assert q4.weight_bytes() < q8.weight_bytes() < 0.3 * f32.weight_bytes()
    assert _sqnr_db(ref, q8.logits(ids)) > _sqnr_db(ref, q4.logits(ids)) + 6 > 6 + 5
    assert q4.generate(ids, 4).shape == (2, 4)


def test_real_depth_pruned_checkpoint_builds_as_changed(real):
    model, tok = tiny_llama(layers=3), tiny_tokenizer()
    variant = Variant(steps=(DepthStep(layers="1"),), deploy=Deploy(runtime=LCPP))
    apply(model, variant, tokenizer=tok)
    rt = realise(model, tok, variant.deploy, steps=variant.steps)
    ids = _prompts()
    assert _sqnr_db(_hf_logits(model, ids), rt.logits(ids)) > 50


def test_real_export_writes_the_gguf_with_its_manifest_and_reloads(real, tiny256, f32, tmp_path):
    from greenopt.ship.exporter import MANIFEST, export, files_sha256

    variant = Variant(deploy=Deploy(runtime=LCPP))
    m = export(*tiny256, variant, None, tmp_path / "exp", runtime=f32, check_reload=True)
    folder = tmp_path / "exp"
    names = {p.name for p in folder.iterdir()}
    assert {"model.gguf", real.BUILD_FILE, MANIFEST, "README.md"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert m.loader == LCPP and "a llama.cpp GGUF file (float32; F32 x29)" in m.loader_reason
    assert m.weights_sha256 == files_sha256(folder, LCPP)
    readme = (folder / "README.md").read_text()
    assert "library_name: llama-cpp-python" in readme and "llama_cpp.Llama(model_path=" in readme
    shipped = load_artifact(folder, m.variant.deploy)
    ids = _prompts()
    assert shipped.kernels == f32.kernels and torch.equal(shipped.logits(ids), f32.logits(ids))


def test_real_measure_runs_the_workload_on_the_runtime(real, tiny256, f32):
    from greenopt.config import protocol_preset
    from greenopt.measure.workload import measure
    from greenopt.testing import FakeMeter

    m = measure(f32, tiny256[1], protocol_preset("smoke"), FakeMeter())
    assert len(m.trials) >= 5 and all(t.generated_tokens > 0 for t in m.trials)


@pytest.mark.integration
def test_default_model_on_llama_cpp_agrees_with_transformers(real, home):
    """SmolLM2-135M: top-1 agreement with float32 transformers on the first 128 tokens of the GO-1
    prompt text (measured: f32 1.0, q8_0 0.98, q4_k_m 0.84). Its 576-wide rows are not whole
    256-value K-quant blocks, so llama.cpp's q4_k_m puts most matrices in its Q5_0 fallback, and
    describe() says so."""
    from greenopt.measure.workload import prompt_texts
    from greenopt.models import load_model
    from greenopt.runtimes import TransformersRuntime

    if "AMX_INT8" in real.system_flags().split():
        pytest.skip("this llama-cpp-python build has llama.cpp's AMX backend (refused for quantized weights)")
    model, tok, _ = load_model("default", dtype="float32", device="cpu")
    ids = tok("\n".join(prompt_texts()[:4]), return_tensors="pt")["input_ids"][:, :128]
    with torch.inference_mode():
        want = TransformersRuntime(model, tok).logits(ids).argmax(-1)
    for weights, floor in (("dense", 0.99), ("q8_0", 0.9), ("q4_k_m", 0.6)):
        rt = realise(model, tok, Deploy(runtime=LCPP, weights=weights))
        agree = float((rt.logits(ids).argmax(-1) == want).float().mean())
        assert agree > floor, (weights, agree)
        assert rt.generate(ids[:, :16], 8).shape == (1, 8)
    assert rt.describe().kernels[0].startswith("Q5_0 x")


def test_real_verify_measures_the_gguf_export_against_transformers(real, tiny256, f32, tmp_path):
    from greenopt.config import protocol_preset
    from greenopt.ship.exporter import ExportProvenance, export
    from greenopt.ship.gate import VerifySpec, verify

    base = tmp_path / "base"
    tiny256[0].save_pretrained(base)
    tiny256[1].save_pretrained(base)
    prov = ExportProvenance(base_model=str(base), protocol=protocol_preset("smoke"))
    export(*tiny256, Variant(deploy=Deploy(runtime=LCPP)), None, tmp_path / "exp", runtime=f32, provenance=prov)
    r = verify(VerifySpec(source=str(tmp_path / "exp"), target="G", meter="estimate", cpu_watts=10, tasks=(),
                          device="cpu", allow_estimate=True))
    assert r.card is not None, r.reason
    assert r.card.runtime.deployed.name == LCPP and r.card.runtime.deployed.kernels == f32.kernels
    assert r.card.runtime.baseline.name == "transformers" and r.passed, r.reason
