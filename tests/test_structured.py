"""Width (FFN channels, KV head groups) and depth (whole layers) pruning on the tiny llama."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from greenopt.compress import ApplyContext, accounting, apply, depth, width
from greenopt.config import CalibSpec, DepthStep, Variant, WidthStep
from greenopt.errors import MoveError
from greenopt.testing import tiny_llama, tiny_tokenizer

CALIB = CalibSpec(samples=8, seq_len=64)
H, I, LAYERS, VOCAB = 64, 128, 4, 320


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ids(tok):
    return tok("Energy is measured in joules, power in watts. The quick brown fox", return_tensors="pt").input_ids


def _apply(model, tok, *steps):
    return apply(model, Variant(steps=list(steps)), tokenizer=tok, calib=CALIB)


def _reloaded_logits(model, ids, path):
    model.save_pretrained(path)
    again = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return again(ids).logits, again


def _flops(layers, inter, q_heads, kv_heads, hd=16):
    attn = 2 * H * hd * (2 * q_heads + 2 * kv_heads)
    return layers * (attn + 2 * 3 * H * inter) + 2 * H * VOCAB


def test_flops_formula_matches_baseline():
    assert accounting.flops_per_token(tiny_llama()) == _flops(4, I, 4, 2)


# ---------------------------------------------------------------------------- width


def test_width_shrinks_and_reloads(tok, ids, tmp_path):
    model = tiny_llama()
    report = _apply(model, tok, WidthStep(ffn_keep=0.5, heads_keep=0.5))
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (64, H)
        assert layer.mlp.down_proj.weight.shape == (H, 64)
        assert layer.self_attn.q_proj.weight.shape == (2 * 16, H)
        assert layer.self_attn.k_proj.weight.shape == (16, H)
        assert layer.self_attn.o_proj.weight.shape == (H, 32)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 1, 16)
    assert report.flops_per_token_after == _flops(4, 64, 2, 1)
    assert report.params_after < report.params_before
    assert report.steps[0].modules == 4 * 7
    with torch.no_grad():
        out = model(ids).logits
    again, reloaded = _reloaded_logits(model, ids, tmp_path)
    assert torch.allclose(out, again, atol=1e-5)
    gen = reloaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5


def test_width_ffn_only_keeps_attention(tok):
    model = tiny_llama()
    _apply(model, tok, WidthStep(ffn_keep=0.3))
    assert model.config.intermediate_size == 40  # round(0.3 * 128) = 38 -> multiple of 8
    assert model.model.layers[0].self_attn.q_proj.out_features == 64


def test_width_activation_score_keeps_the_strongest_channels(tok):
    model = tiny_llama()
    down = model.model.layers[2].mlp.down_proj.weight.detach().clone()
    with torch.no_grad():  # make channels 0-7 dominant by weight, so any score must keep them
        model.model.layers[2].mlp.down_proj.weight[:, :8] *= 50
    _apply(model, tok, WidthStep(ffn_keep=0.25))
    kept = model.model.layers[2].mlp.down_proj.weight
    assert torch.allclose(kept[:, :8], down[:, :8] * 50)


def test_width_scores_differ(tok):
    a, b = tiny_llama(), tiny_llama()
    _apply(a, tok, WidthStep(ffn_keep=0.5, score="activation"))
    _apply(b, tok, WidthStep(ffn_keep=0.5, score="magnitude"))
    assert not all(torch.equal(x.mlp.up_proj.weight, y.mlp.up_proj.weight)
                   for x, y in zip(a.model.layers, b.model.layers))


def test_width_subset_records_sizes_and_rebuilds(tok, ids, tmp_path):
    model = tiny_llama()
    report = _apply(model, tok, WidthStep(ffn_keep=0.5, heads_keep=0.5, layers="1-2"))
    assert model.config.intermediate_size == I
    meta = model.config.greenopt_width
    assert set(meta["layers"]) == {"1", "2"}
    assert meta["layers"]["1"] == {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    assert any("rebuild_width" in n for n in report.steps[0].notes)
    with torch.no_grad():
        out = model(ids).logits
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_config(cfg).eval()
    width.rebuild_width(fresh, cfg.greenopt_width)
    result = fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}  # tied
    fresh.tie_weights()
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, out, atol=1e-5)


def test_width_then_full_width_makes_config_uniform_again(tok):
    model = tiny_llama()
    _apply(model, tok, WidthStep(ffn_keep=0.5, layers="0"), WidthStep(ffn_keep=0.5, layers="1-3"))
    assert model.config.intermediate_size == 64
    assert not hasattr(model.config, "greenopt_width")


def test_width_cut_breaking_gqa(tok):
    with pytest.raises(MoveError, match="GQA"):
        _apply(tiny_llama(), tok, WidthStep(heads_keep=0.75))  # 3 of 4 query heads, groups of 2


def test_width_cut_to_no_heads(tok):
    with pytest.raises(MoveError, match="heads_keep"):
        _apply(tiny_llama(heads=4, kv_heads=1), tok, WidthStep(heads_keep=0.5))


def test_ffn_keep_count_rounding():
    assert width.ffn_keep_count(1536, 0.5) == 768
    assert width.ffn_keep_count(128, 0.3) == 40
    assert width.ffn_keep_count(10, 0.5) == 5
    assert width.ffn_keep_count(4, 0.01) == 1


def test_width_activation_needs_tokenizer():
    with pytest.raises(MoveError, match="tokenizer"):
        apply(tiny_llama(), Variant(steps=[WidthStep(ffn_keep=0.5)]))


# ---------------------------------------------------------------------------- depth


def test_depth_drops_layers_and_reloads(tok, ids, tmp_path):
    model = tiny_llama()
    report = _apply(model, tok, DepthStep(drop=2))
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert report.flops_per_token_after == _flops(2, I, 4, 2)
    with torch.no_grad():
        out = model(ids).logits
    again, reloaded = _reloaded_logits(model, ids, tmp_path)
    assert torch.allclose(out, again, atol=1e-5)
    assert len(reloaded.model.layers) == 2


def test_depth_generate_with_cache_matches_without(tok, ids):
    model = tiny_llama()
    _apply(model, tok, DepthStep(drop=1))
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    plain = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_depth_score_finds_a_pass_through_layer(tok):
    model = tiny_llama()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: distance 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    dist = depth.block_distances(model, ApplyContext(tokenizer=tok, calib=CALIB).calibration(), 1)
    assert set(dist) == {1, 2}
    assert dist[2] < 1e-3 < dist[1] <= 1.0
    kept = [model.model.layers[i] for i in (0, 1, 3)]
    report = _apply(model, tok, DepthStep(drop=1))
    assert list(model.model.layers) == kept
    assert "[2]" in report.steps[0].summary


def test_depth_explicit_layers_may_include_ends(tok):
    model = tiny_llama()
    kept = [model.model.layers[i] for i in (1, 2)]
    apply(model, Variant(steps=[DepthStep(layers="0,3")]))  # no calibration needed
    assert list(model.model.layers) == kept


@pytest.mark.parametrize("step", [DepthStep(drop=4), DepthStep(drop=7), DepthStep(layers="0-3"),
                                  DepthStep(drop=3), DepthStep(drop=1, layers="0,1")])
def test_depth_bad_drops(tok, step):
    with pytest.raises(MoveError, match="depth"):
        _apply(tiny_llama(), tok, step)


def test_depth_remaps_recorded_layer_metadata(tok):
    model = tiny_llama()
    _apply(model, tok, WidthStep(ffn_keep=0.5, layers="3"), DepthStep(layers="1"))
    assert set(model.config.greenopt_width["layers"]) == {"2"}
    assert model.model.layers[2].mlp.gate_proj.out_features == 64
