"""GPTQ checkpoints: greenopt's rtn/gptq codes imported into onnxruntime-genai without re-quantizing."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from greenopt.compress import apply
from greenopt.compress.q_packed import SCALE_DTYPE, PackedLinear, unpack
from greenopt.config import Deploy, QuantizeStep, Target, Variant
from greenopt.config.variant import QuantOverride
from greenopt.errors import ConfigError
from greenopt.runtimes import TransformersRuntime, unrealisable
from greenopt.runtimes.gptq_export import (
    IMPORTED,
    gptq_tensors,
    has_packed,
    pack_int32,
    step_refusal,
    unpack_int32,
    write_gptq,
)
from greenopt.testing import tiny_llama, tiny_tokenizer

ORT = "onnxruntime-genai"


def _quantized(method="rtn", bits=4, group_size=32, **step):
    model, tok = tiny_llama(), tiny_tokenizer()
    apply(model, Variant(steps=(QuantizeStep(method=method, bits=bits, group_size=group_size, **step),)), tokenizer=tok)
    return model, tok


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_round_trips_and_puts_feature_i_at_its_bits(bits):
    per = 32 // bits
    codes = torch.randint(0, 1 << bits, (3 * per, 5))
    words = pack_int32(codes, bits, dim=0)
    assert words.dtype == torch.int32 and words.shape == (3, 5)
    assert torch.equal(unpack_int32(words, bits, dim=0), codes)
    one = torch.zeros(per, 1, dtype=torch.int64)
    one[per - 1] = (1 << bits) - 1  # the top slot: the sign bit of the int32 word
    assert int(pack_int32(one, bits, 0)) == -(1 << (32 - bits))
    with pytest.raises(ValueError, match="do not fill"):
        pack_int32(torch.zeros(per + 1, 2, dtype=torch.int64), bits, dim=0)


@pytest.mark.parametrize(("method", "bits", "group_size"), [("rtn", 4, 32), ("rtn", 8, 16), ("gptq", 4, 64)])
def test_gptq_tensors_dequantize_as_the_reader_does_to_the_modules_weights(method, bits, group_size):
    """The builder's reader: w[i, o] = scale[g, o] * (q[i, o] - (qzeros[g, o] + 1)), g = g_idx[i]."""
    model, _ = _quantized(method, bits, group_size)
    mod = model.model.layers[1].mlp.down_proj
    t = gptq_tensors(mod)
    q = unpack_int32(t["qweight"], bits, dim=0)  # [in, out]
    zeros = (unpack_int32(t["qzeros"], bits, dim=1) + 1) & ((1 << bits) - 1)  # [groups, out]
    g = t["g_idx"].long()
    assert torch.equal(g, torch.arange(mod.in_features) // group_size) and t["scales"].dtype == SCALE_DTYPE
    w = (t["scales"].float()[g] * (q - zeros[g]).float()).t()
    torch.testing.assert_close(w, mod.dequantize(torch.float32), atol=1e-6, rtol=1e-3)
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}


def test_float_zero_points_are_refused():
    model, _ = _quantized("hqq", 4, 32)
    with pytest.raises(ValueError, match="not 4-bit integers"):
        gptq_tensors(model.model.layers[0].self_attn.q_proj)


def test_write_gptq_writes_a_gptq_config_codes_and_one_tied_embedding(tmp_path):
    model, tok = _quantized()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    written = write_gptq(model, tok, tmp_path)
    assert (written.bits, written.group_size, written.modules) == (4, 32, 4 * 7)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] | {} == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                                  "sym": False, "static_groups": False, "checkpoint_format": "gptq"}
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.qweight" in tensors and "model.layers.0.mlp.up_proj.codes" not in tensors
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied: written once
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left as found


@pytest.mark.parametrize(("step", "match"), [
    (dict(method="hqq"), "codes are not in the GPTQ format"),
    (dict(bits=3), "3-bit codes"),
    (dict(group_size=8), "not a MatMulNBits block size"),
    (dict(target=Target(layers="0-1")), "is float"),
    (dict(overrides=(QuantOverride(target=Target(include=("*mlp*",)), bits=8),)), "the GPTQ import takes one width"),
])
def test_write_gptq_names_the_module_the_format_cannot_hold(tmp_path, step, match):
    model, tok = _quantized(**({"method": "rtn", "bits": 4, "group_size": 32} | step))
    with pytest.raises(ConfigError, match=match):
        write_gptq(model, tok, tmp_path)


def test_a_quantized_head_is_refused(tmp_path):
    model, tok = _quantized(target=Target(include=("*", "lm_head")))
    with pytest.raises(ConfigError, match="lm_head/embedding codes are not imported"):
        write_gptq(model, tok, tmp_path)


@pytest.mark.parametrize(("step", "deploy", "match"), [
    (dict(method="hqq"), {}, "method hqq"),
    (dict(bits=3), {}, "3-bit codes"),
    (dict(), dict(weights="int8"), "weights: int4"),
    (dict(group_size=64), {}, "block_size: 64"),
    (dict(group_size=48), {}, "group_size to one of them"),
    (dict(target=Target(layers="0-1")), {}, "over part of the decoder"),
    (dict(target=Target(include=("*", "lm_head"))), {}, "quantizes lm_head"),
    (dict(overrides=(QuantOverride(target=Target(include=("*mlp*",)), bits=8),)), {}, "overrides change bits"),
])
def test_step_refusal_says_what_to_change(step, deploy, match):
    q = QuantizeStep(**({"method": "rtn", "bits": 4, "group_size": 32} | step))
    reason = step_refusal(q, Deploy(runtime=ORT, weights="int4", block_size=32).model_copy(update=deploy))
    assert reason is not None and match in reason, reason
    assert reason == unrealisable(Deploy(runtime=ORT, weights="int4", block_size=32).model_copy(update=deploy), (q,))


@pytest.mark.parametrize(("method", "bits", "weights"), [("rtn", 4, "int4"), ("gptq", 4, "int4"), ("rtn", 8, "int8")])
def test_an_importable_step_is_realisable(method, bits, weights):
    q = QuantizeStep(method=method, bits=bits, group_size=32)
    assert step_refusal(q, Deploy(runtime=ORT, weights=weights, block_size=32)) is None


def test_has_packed():
    assert has_packed(_quantized()[0]) and not has_packed(tiny_llama())


# --- the builder itself -------------------------------------------------------------------------

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai is not installed (pip install 'greenopt[ort]')")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENOPT_HOME", str(tmp_path))
    return tmp_path


def _ids():
    return torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(4))


@needs_ort
@pytest.mark.parametrize(("method", "bits", "group_size"), [("rtn", 4, 32), ("rtn", 8, 16), ("gptq", 4, 64)])
def test_imported_codes_compute_what_torch_computed(home, method, bits, group_size):
    """Float activations (accuracy_level 0): the ONNX model's logits are torch's packed model's to
    1e-4, at every position; the builder's own re-quantization of the dequantized weights is not."""
    from greenopt.runtimes import deploy

    step = QuantizeStep(method=method, bits=bits, group_size=group_size)
    target = Deploy(runtime=ORT, weights=f"int{bits}", block_size=group_size, accuracy_level=0)
    want_model, tok = _quantized(method, bits, group_size)
    with torch.inference_mode():
        want = TransformersRuntime(want_model, tok).logits(_ids())
    rt, report = deploy(tiny_llama(), tok, Variant(steps=(step,), deploy=target))
    got = rt.logits(_ids())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert rt.describe().options["weights_source"] == IMPORTED
    assert any(k.startswith(f"MatMulNBits int{bits} block {group_size}") for k in rt.kernels), rt.kernels
    assert report.weight_bytes_after == rt.weight_bytes()


@needs_ort
def test_a_deploy_that_names_another_width_is_refused_before_building(home):
    from greenopt.runtimes import realise

    model, tok = _quantized()
    with pytest.raises(ConfigError, match="set weights: int4"):
        realise(model, tok, Deploy(runtime=ORT, weights="int8", block_size=32))
    with pytest.raises(ConfigError, match="set block_size: 32"):
        realise(model, tok, Deploy(runtime=ORT, weights="int4", block_size=64))
    assert not list((home / "runtimes" / ORT).glob("*/genai_config.json"))


@needs_ort
def test_weights_differ_from_a_builder_quantized_float_model(home):
    """The point of importing: the builder's own int4 of the same float model is another model."""
    from greenopt.runtimes import realise

    model, tok = _quantized()
    imported = realise(model, tok, Deploy(runtime=ORT, weights="int4", block_size=32, accuracy_level=0))
    own = realise(tiny_llama(), tok, Deploy(runtime=ORT, weights="int4", block_size=32, accuracy_level=0))
    assert "weights_source" not in own.describe().options
    assert float((imported.logits(_ids()) - own.logits(_ids())).abs().max()) > 1e-3


# --- the search space ---------------------------------------------------------------------------

def test_the_space_samples_imported_codes_for_onnx_runtime():
    from greenopt.config import SpaceSpec
    from greenopt.search.space import baseline_params, build, dims, not_sampled, single_moves

    spec = SpaceSpec(runtimes=(ORT,), runtime_weights=("int8", "int4"), ort_codes=("builder", "gptq"),
                     block_sizes=(32, 64))
    assert "deploy.ort_codes" in [d.name for d in dims(spec, 10)]
    base = {**baseline_params(spec, 10), "deploy.runtime": ORT, "deploy.block_size": 64, "depth.drop": 1}
    own = build({**base, "deploy.ort_codes": "builder"}, spec, 10)
    assert [s.kind for s in own.steps] == ["depth"]
    for weights, bits in (("int4", 4), ("int8", 8)):
        v = build({**base, "deploy.weights": weights, "deploy.ort_codes": "gptq"}, spec, 10)
        assert [s.kind for s in v.steps] == ["depth", "quantize"]
        q = v.steps[-1]
        assert (q.method, q.bits, q.group_size, q.target) == ("gptq", bits, 64, Target())
        assert unrealisable(v.deploy, v.steps) is None and v.hash != own.hash
    assert "gptq codes of every decoder Linear" in not_sampled(spec)[0]
    assert not any(p.get("deploy.ort_codes") == "gptq" for p in single_moves(spec, 10))  # warm start: one move each
    plain = SpaceSpec(runtimes=(ORT,))
    assert "deploy.ort_codes" not in [d.name for d in dims(plain, 10)] and "codes" not in not_sampled(plain)[0]


def test_imported_codes_are_left_out_where_a_block_size_does_not_divide_the_model():
    from greenopt.config import SpaceSpec
    from greenopt.search.space import space_for_model

    model = tiny_llama()  # hidden 64, intermediate 128
    spec = SpaceSpec(runtimes=(ORT,), ort_codes=("builder", "rtn"), block_sizes=(32, 128))
    narrowed, why = space_for_model(spec, model.config)
    assert narrowed.ort_codes == ("builder",) and "block_size 128 does not divide" in why["ort_codes"]
    fine, none = space_for_model(spec.model_copy(update={"block_sizes": (16, 64)}), model.config)
    assert fine.ort_codes == ("builder", "rtn") and "ort_codes" not in none
