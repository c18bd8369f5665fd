"""Tied embedding/head quantization: one packed tensor at both paths, kept tied through export;
untied models quantize each separately; lm_head and embedding as search dimensions."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from safetensors import safe_open

import greenopt.compress.q_packed as qp
from greenopt.compress import ApplyContext, accounting, apply, check
from greenopt.compress.q_packed import PackedEmbedding, PackedLinear
from greenopt.compress.q_tied import PackedTied
from greenopt.config import QuantizeStep, QuantOverride, SpaceSpec, Target, Variant
from greenopt.errors import MoveError
from greenopt.models.files import WEIGHTS
from greenopt.search import space as sp
from greenopt.ship import ExportProvenance, export, load
from greenopt.testing import tiny_llama, tiny_tokenizer

IDS = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(3))
HEAD = Target(include=("lm_head",), exclude=())
EMBED = Target(include=("model.embed_tokens",), exclude=())
needs_hqq = pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="hqq not installed")


class Ctx(ApplyContext):
    """Seeded random-token calibration for gptq on a random tiny model."""

    def calibration(self):
        return torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(2))


def _logits(m):
    with torch.inference_mode():
        return m(IDS).logits.float()


def _sqnr_db(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def _head(bits=8, method="rtn", target=HEAD, group_size=32):
    return Variant(steps=(QuantizeStep(method=method, bits=bits, group_size=group_size, target=target),))


def _export(model, variant, report, out):
    export(model, tiny_tokenizer(), variant, None, out,
           provenance=ExportProvenance(base_model="tiny", apply_report=report))
    files = [out / WEIGHTS, out / "model.safetensors"]
    return next(f for f in files if f.is_file())


# ---------------------------------------------------------------------------- the tied move


@pytest.mark.parametrize("method", ["rtn", pytest.param("hqq", marks=needs_hqq)])
def test_quantizing_a_tied_head_quantizes_the_shared_weight_once(method):
    m = tiny_llama()
    ref, bytes_before, params_before = _logits(m), accounting.weight_bytes(m), accounting.param_count(m)
    flops_before = accounting.flops_per_token(m)
    report = apply(m, _head(method=method))
    assert isinstance(m.lm_head, PackedTied) and m.lm_head is m.model.embed_tokens
    assert m.config.tie_word_embeddings is True
    step = report.steps[0]
    assert step.notes[0].startswith("tied: lm_head and model.embed_tokens share one int8 tensor")
    vocab, hidden = m.config.vocab_size, m.config.hidden_size
    # One packed copy replaces the one fp32 copy: 8 bits + two fp16 per group of 32 instead of 32 bits.
    assert bytes_before - accounting.weight_bytes(m) == vocab * hidden * 4 - vocab * hidden * 9 // 8
    assert accounting.param_count(m) == params_before and accounting.flops_per_token(m) == flops_before
    bits = accounting.bits_per_layer(m)
    assert bits["lm_head"] == bits["model.embed_tokens"] == 9.0
    assert _sqnr_db(ref, _logits(m)) > 28


def test_quantizing_the_embedding_of_a_tied_model_quantizes_the_head_with_it():
    m = tiny_llama()
    report = apply(m, _head(bits=4, target=EMBED))
    emb = m.model.embed_tokens
    assert isinstance(emb, PackedTied) and m.lm_head is emb
    assert torch.equal(emb(IDS), emb.dequantize()[IDS])  # lookups dequantize only the rows they gather
    hidden = torch.randn(3, m.config.hidden_size)
    assert torch.allclose(m.lm_head(hidden), hidden @ emb.dequantize().T, atol=1e-5)
    assert "int4" in report.steps[0].notes[0] and report.steps[0].modules == 1


def test_targeting_both_with_the_same_settings_gives_one_module():
    m = tiny_llama()
    report = apply(m, _head(target=Target(include=("lm_head", "model.embed_tokens"), exclude=())))
    assert m.lm_head is m.model.embed_tokens and report.steps[0].modules == 2
    assert sum(isinstance(x, PackedTied) for x in m.modules()) == 1


@pytest.mark.parametrize("step,message", [
    (QuantizeStep(method="rtn", bits=8, group_size=32, target=Target(include=("lm_head", "model.embed_tokens"),
                                                                        exclude=()),
                  overrides=(QuantOverride(target=EMBED, bits=4),)), "different settings"),
    (QuantizeStep(method="rtn", bits=8, group_size=32, target=Target(include=("lm_head", "model.embed_tokens"),
                                                                        exclude=()),
                  overrides=(QuantOverride(target=EMBED, bits=16),)), "model.embed_tokens is overridden to 16 bits"),
])
def test_conflicting_settings_for_one_tied_tensor_fail_before_any_work(step, message):
    m = tiny_llama()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(MoveError, match=message):
        check(m, Variant(steps=(step,)))
    with pytest.raises(MoveError, match=message):
        apply(m, Variant(steps=(step,)))
    assert type(m.lm_head) is torch.nn.Linear and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_a_method_without_shareable_codes_unties_and_says_the_model_grows():
    m = tiny_llama()
    before = accounting.weight_bytes(m)
    report = apply(m, _head(method="gptq"), ctx=Ctx(tokenizer=object()))
    assert isinstance(m.lm_head, PackedLinear) and type(m.model.embed_tokens) is torch.nn.Embedding
    assert m.config.tie_word_embeddings is False
    note = report.steps[0].notes[0]
    assert "untied lm_head" in note and "model grows" in note and "rtn or hqq keep them tied" in note
    assert accounting.weight_bytes(m) > before


def test_the_tied_module_stays_one_through_deepcopy_and_dtype_casts():
    m = tiny_llama()
    apply(m, _head())
    twin = copy.deepcopy(m)
    assert twin.lm_head is twin.model.embed_tokens and twin.lm_head is not m.lm_head
    twin.to(torch.bfloat16)
    assert twin.model.embed_tokens(IDS).dtype == torch.bfloat16
    assert twin.lm_head.codes.dtype == torch.uint8 and twin.lm_head is twin.model.embed_tokens


# ---------------------------------------------------------------------------- kernels


@pytest.mark.skipif(not qp._INT4_CPU, reason="this torch has no _weight_int4pack_mm_for_cpu")
def test_a_bf16_tied_head_at_4_bits_takes_the_fused_kernel(monkeypatch):
    calls = []
    real = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = tiny_llama().to(torch.bfloat16)
    report = apply(m, _head(bits=4))
    assert report.fast_kernel and "fused int4 kernel" in report.steps[0].notes[1]
    x = torch.randn(2, m.config.hidden_size).bfloat16()
    fused = m.lm_head(x)
    assert calls
    dense = x.float() @ m.lm_head.dequantize(torch.float32).T
    assert torch.nn.functional.cosine_similarity(fused.float().flatten(), dense.flatten(), dim=0) > 0.9999


@pytest.mark.parametrize("bits,dtype,kernel", [(8, torch.bfloat16, True), (4, torch.float32, True),
                                               (4, torch.bfloat16, False)])
def test_without_a_kernel_the_notes_say_it_dequantizes_per_call(monkeypatch, bits, dtype, kernel):
    monkeypatch.setattr(qp, "_INT4_CPU", kernel)  # 8-bit and fp32 never take it; 4-bit bf16 only with it
    m = tiny_llama().to(dtype)
    report = apply(m, _head(bits=bits))
    assert not report.fast_kernel
    assert f"dequantizes its int{bits} codes on every call" in report.steps[0].notes[1]
    assert m.lm_head(torch.randn(1, m.config.hidden_size, dtype=dtype)).dtype == dtype


# ---------------------------------------------------------------------------- checkpoint


def test_export_round_trips_the_tied_module_and_the_checkpoint_no_longer_grows(tmp_path):
    dense = tiny_llama()
    dense_file = _export(dense, Variant(), None, tmp_path / "dense")

    tied = tiny_llama()
    variant = _head()
    report = apply(tied, variant)
    want = _logits(tied)
    tied_file = _export(tied, variant, report, tmp_path / "tied")

    untied = tiny_llama()  # what quantizing the head did before: untie, keep the dense embedding
    gptq = _head(method="gptq")
    untied_file = _export(untied, gptq, apply(untied, gptq, ctx=Ctx(tokenizer=object())), tmp_path / "untied")

    assert tied_file.stat().st_size < dense_file.stat().st_size < untied_file.stat().st_size
    with safe_open(str(tied_file), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("lm_head.") for k in keys) and "model.embed_tokens.codes" in keys

    back = load(tmp_path / "tied")
    assert back.lm_head is back.model.embed_tokens and isinstance(back.lm_head, PackedTied)
    assert back.config.tie_word_embeddings is True
    assert torch.equal(_logits(back), want)
    assert accounting.weight_bytes(back) == accounting.weight_bytes(tied)


def test_a_manifest_whose_shared_module_points_nowhere_is_refused(tmp_path):
    import json

    from greenopt.errors import ConfigError
    from greenopt.models.checkpoint import MODULES

    m = tiny_llama()
    _export(m, _head(), apply(m, _head()), tmp_path / "out")
    path = tmp_path / "out" / MODULES
    spec = json.loads(path.read_text())
    spec["shared_modules"] = {"lm_head": "model.layers.0"}
    path.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="shared module lm_head points at 'model.layers.0'"):
        load(tmp_path / "out")


# ---------------------------------------------------------------------------- untied models


def test_an_untied_model_quantizes_head_and_embedding_separately(tmp_path):
    m = tiny_llama(tie_embeddings=False)
    variant = Variant(steps=(QuantizeStep(method="hqq" if importlib.util.find_spec("hqq") else "rtn", bits=8,
                                          group_size=32, target=HEAD),
                             QuantizeStep(method="rtn", bits=4, group_size=32, target=EMBED)))
    report = apply(m, variant)
    assert type(m.lm_head) is PackedLinear and type(m.model.embed_tokens) is PackedEmbedding
    assert not any("tied" in n for s in report.steps for n in s.notes)
    bits = accounting.bits_per_layer(m)
    assert bits["lm_head"] == 9.0 and bits["model.embed_tokens"] == 5.0
    want = _logits(m)
    _export(m, variant, report, tmp_path / "out")
    assert torch.equal(_logits(load(tmp_path / "out")), want)


def test_an_untied_embedding_takes_rtn_only():
    m = tiny_llama(tie_embeddings=False)
    with pytest.raises(MoveError, match="only method rtn quantizes embeddings"):
        check(m, _head(method="hqq", target=EMBED))


# ---------------------------------------------------------------------------- search space


def test_embedding_bits_is_a_dimension_that_builds_an_rtn_step():
    spec = SpaceSpec(bits=(), prune=(), depth_drop_max=0, ffn_keep_min=1, dtypes=(), lm_head_bits=(8,),
                     embedding_bits=(8, 4))
    by = {d.name: d for d in sp.dims(spec, 4)}
    assert set(by) == {"bits.lm_head", "bits.embedding"} and by["bits.embedding"].choices == (16, 8, 4)
    steps = sp.build({"bits.embedding": 4}, spec, 4).steps
    assert len(steps) == 1 and steps[0].method == "rtn" and steps[0].bits == 4
    m = tiny_llama(tie_embeddings=False)
    apply(m, Variant(steps=steps))
    assert isinstance(m.model.embed_tokens, PackedEmbedding) and type(m.lm_head) is torch.nn.Linear
    moves = sp.single_moves(spec, 4)
    assert {"bits.lm_head": 8, "bits.embedding": 16} in moves and {"bits.lm_head": 16, "bits.embedding": 4} in moves


def test_existing_head_variants_keep_their_hashes():
    spec = SpaceSpec(lm_head_bits=(8, 4))
    assert "bits.embedding" not in {d.name for d in sp.dims(spec, 30)}
    assert sp.build({"bits.lm_head": 8}, spec, 30).hash == "c3252d5cd266"  # as before embedding_bits existed
    assert sp.build({"bits.lm_head": 8, "bits.embedding": 16}, spec, 30).hash == "c3252d5cd266"


def test_embedding_bits_is_left_out_on_a_tied_model_with_a_reason():
    spec = SpaceSpec(embedding_bits=(8,))
    narrowed, why = sp.space_for_model(spec, tiny_llama().config)
    assert narrowed.embedding_bits == (16,) and "bits.embedding" not in {d.name for d in sp.dims(narrowed, 4)}
    assert "tie_word_embeddings" in why["embedding_bits"]
    same, none = sp.space_for_model(spec, tiny_llama(tie_embeddings=False).config)
    assert same == spec and none == {}
    assert sp.space_for_model(SpaceSpec(), tiny_llama().config) == (SpaceSpec(), {})


def test_the_search_and_recipe_validate_leave_embedding_bits_out_on_a_tied_model(tiny_dir, tmp_path):
    from greenopt.config import SearchSpec
    from greenopt.search.runner import TransformersRunner
    from greenopt.validate import validate_file

    space = SpaceSpec(bits=(16,), embedding_bits=(8,), dtypes=(), prune=(), moefy_experts=(), moefy_top_k=())
    runner = TransformersRunner(SearchSpec(model=str(tiny_dir), space=space))  # the config read, no weights
    fitted = runner.fit_space(space, tmp_path / "kernels.json")
    assert fitted.embedding_bits == (16,) and "tie_word_embeddings" in runner._left_out["embedding_bits"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: {tiny_dir}\nsearch:\n  target: A\n  space: {{embedding_bits: [8]}}\n")
    report = validate_file(recipe)
    assert report.ok, report
    assert any("search.space.embedding_bits: left out" in n for n in report.notes)


# ---------------------------------------------------------------------------- the default model


@pytest.mark.integration
def test_default_model_lm_head_int8_tied_shrinks_the_checkpoint(tmp_path):
    """SmolLM2-135M (vocab 49152 x 576, tied): the search's lm_head int8 move (hqq g64) keeps one
    tensor; export reloads to the same logits; KL and perplexity on held-aside text stay close."""
    import torch.nn.functional as F

    from greenopt import offline
    from greenopt.compress.calibration import text_windows
    from greenopt.config import KLSpec
    from greenopt.evaluate.fidelity import baseline_reference, kl_look
    from greenopt.models import load_model

    model, tok, _ = load_model("default")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    windows = text_windows(tok, offline.wiki_split("perplexity"), 8, 256)

    def ppl(m):
        with torch.inference_mode():
            logits = m(windows).logits
        return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item())

    ref = baseline_reference(model, tok, KLSpec(windows=16))
    base_ppl = ppl(model)
    dense_file = _export(model, Variant(), None, tmp_path / "dense")
    space = SpaceSpec(lm_head_bits=(8,))
    variant = sp.build({"bits.lm_head": 8}, space, model.config.num_hidden_layers)
    report = apply(model, variant, tokenizer=tok)
    assert model.lm_head is model.model.embed_tokens and model.config.tie_word_embeddings
    kl, head_ppl = kl_look(model, ref, tok).kl_nats_per_token, ppl(model)
    want = _logits(model)
    tied_file = _export(model, variant, report, tmp_path / "tied")
    dense_mb, tied_mb = dense_file.stat().st_size / 1e6, tied_file.stat().st_size / 1e6
    print(f"\ncheckpoint {dense_mb:.1f} -> {tied_mb:.1f} MB; weight bytes {report.weight_bytes_before / 1e6:.1f} -> "
          f"{report.weight_bytes_after / 1e6:.1f} MB; KL {kl:.5f} nats/token; ppl {base_ppl:.3f} -> {head_ppl:.3f}; "
          f"notes {report.steps[0].notes}")
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert dense_mb - tied_mb > vocab * hidden * (4 - 1.1) / 1e6  # one fp32 copy out, one int8 copy in
    assert kl < 0.01 and head_ppl < base_ppl * 1.01
    assert torch.equal(_logits(load(tmp_path / "tied")), want)
