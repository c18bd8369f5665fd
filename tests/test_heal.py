"""Heal: distillation from the pre-variant model lowers KL, is seeded, bounded, keeps masks, exports."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from greenopt.compress import ApplyContext, apply, handler, heal
from greenopt.compress.q_packed import PackedLinear
from greenopt.config import (
    CalibSpec,
    DepthStep,
    HealStep,
    PruneStep,
    QuantizeStep,
    Variant,
    WidthStep,
)
from greenopt.errors import MoveError
from greenopt.testing import tiny_llama, tiny_tokenizer

CALIB = CalibSpec(samples=4, seq_len=32)
HEAL = HealStep(steps=40, batch=4, seq_len=32, lr=3e-4, heldout_rows=8)
PROBE = torch.arange(1, 20).unsqueeze(0)


def _applied(*steps, model=None, ctx=None):
    model = model if model is not None else tiny_llama()
    kwargs = {"ctx": ctx} if ctx is not None else {"tokenizer": tiny_tokenizer(), "calib": CALIB}
    report = apply(model, Variant(steps=steps), **kwargs)
    return model, report


def _held_kl(teacher, student, step=HEAL) -> float:
    _, held = heal.heal_windows(tiny_tokenizer(), step)
    return heal.mean_kl_nats(teacher, student, held)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_depth_drop_then_heal_lowers_kl_to_the_teacher():
    teacher = tiny_llama()
    cut, _ = _applied(DepthStep(drop=1))
    healed, report = _applied(DepthStep(drop=1), HEAL)
    kl_cut, kl_healed = _held_kl(teacher, cut), _held_kl(teacher, healed)
    assert kl_cut > 0.01
    assert kl_healed < 0.8 * kl_cut
    rep = report.steps[1]
    assert rep.kind == "heal" and rep.params_after == rep.params_before
    assert f"KL {kl_cut:.4f} -> {kl_healed:.4f}" in rep.summary  # the reported figures are the measured ones
    assert any("40 of 40 steps run; stopped by steps" in n for n in rep.notes)
    assert any(f"{40 * 4 * 32} training tokens" in n for n in rep.notes)


def test_width_cut_then_heal_lowers_kl_too():
    teacher = tiny_llama()
    cut, _ = _applied(WidthStep(ffn_keep=0.5))
    healed, _ = _applied(WidthStep(ffn_keep=0.5), HEAL)
    assert _held_kl(teacher, healed) < 0.8 * _held_kl(teacher, cut)


def test_two_heals_with_the_same_seed_give_identical_weights():
    a, _ = _applied(DepthStep(drop=1), HEAL)
    b, _ = _applied(DepthStep(drop=1), HEAL)
    c, _ = _applied(DepthStep(drop=1), HEAL.model_copy(update={"seed": 1}))
    assert _same_weights(a, b)
    assert not _same_weights(a, c)  # the seed picks the training windows


def test_training_windows_are_calibration_text_disjoint_from_the_held_out_ones():
    train, held = heal.heal_windows(tiny_tokenizer(), HEAL)
    assert train.shape == (HEAL.steps * HEAL.batch, HEAL.seq_len) and held.shape == (HEAL.heldout_rows, HEAL.seq_len)
    rows = {tuple(r) for r in train.tolist()}
    assert not rows & {tuple(r) for r in held.tolist()}


def test_max_seconds_bounds_the_training(monkeypatch):
    ticks = iter(range(0, 10_000, 10))  # every clock read advances 10 s
    monkeypatch.setattr(heal, "_clock", lambda: float(next(ticks)))
    step = HEAL.model_copy(update={"steps": 50, "max_seconds": 25.0})
    _, report = _applied(DepthStep(drop=1), step)
    notes = report.steps[1].notes
    assert any("3 of 50 steps run; stopped by max_seconds (max_seconds=25)" in n for n in notes)
    assert any(f"{3 * 4 * 32} training tokens" in n for n in notes)
    assert any("re-applying this variant may run a different number of steps" in n for n in notes)


def test_prune_masks_survive_healing():
    pruned, _ = _applied(PruneStep(method="magnitude", sparsity=0.5))
    healed, _ = _applied(PruneStep(method="magnitude", sparsity=0.5), HEAL)
    checked = 0
    for (name, a), b in zip(pruned.named_modules(), healed.modules()):
        if isinstance(a, torch.nn.Linear) and name != "lm_head":  # the default target excludes lm_head
            zero = a.weight == 0
            assert zero.float().mean() > 0.4, name
            assert torch.equal(b.weight == 0, zero), name
            assert not torch.equal(a.weight, b.weight), name  # heal did train the rest
            checked += 1
    assert checked == 4 * 7  # every q/k/v/o/gate/up/down of the 4 layers


def test_a_model_pruned_before_the_variant_keeps_its_zeros_but_stray_zeros_train():
    model, _ = _applied(PruneStep(method="magnitude", sparsity=0.5))
    zero = model.model.layers[0].mlp.up_proj.weight == 0
    stray = model.lm_head.weight  # not pruned (tied to the embedding): a few exact zeros, not a mask
    with torch.no_grad():
        stray[:2, :3] = 0
    _applied(DepthStep(layers="1"), HEAL, model=model)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight == 0, zero)
    assert bool((stray[:2, :3] != 0).all())


def test_quantize_before_heal_is_refused_before_any_work():
    model = tiny_llama()
    want = copy.deepcopy(model.state_dict())
    with pytest.raises(MoveError, match="heal, then quantize"):
        _applied(QuantizeStep(method="rtn", bits=8, group_size=32), HEAL, model=model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in want.items())


def test_an_already_quantized_model_is_refused():
    model, _ = _applied(QuantizeStep(method="rtn", bits=8, group_size=32))
    with pytest.raises(MoveError, match="already quantized.*heal, then quantize"):
        _applied(HEAL, model=model)


def test_heal_then_quantize_applies():
    teacher = tiny_llama()
    model, report = _applied(DepthStep(drop=1), HEAL, QuantizeStep(method="rtn", bits=8, group_size=32))
    assert [s.kind for s in report.steps] == ["depth", "heal", "quantize"]
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    cut, _ = _applied(DepthStep(drop=1), QuantizeStep(method="rtn", bits=8, group_size=32))
    assert _held_kl(teacher, model) < _held_kl(teacher, cut)


def test_model_is_left_in_eval_mode_with_its_grad_flags_and_no_grads():
    model = tiny_llama()
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    ctx = ApplyContext(tokenizer=tiny_tokenizer(), calib=CALIB)
    model.train()
    _applied(DepthStep(drop=1), HEAL, model=model, ctx=ctx)
    assert not model.training and not any(m.training for m in model.modules())
    assert not frozen.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not frozen)
    assert all(p.grad is None for p in model.parameters())
    assert ctx.teacher is None and ctx.earlier == ()  # the teacher copy is freed


def test_no_teacher_copy_without_a_heal_step(monkeypatch):
    copies = []
    monkeypatch.setattr("greenopt.compress._frozen_copy", lambda m: copies.append(m) or m)
    _applied(DepthStep(drop=1))
    assert copies == []
    _applied(DepthStep(drop=1), HEAL.model_copy(update={"steps": 1}))
    assert len(copies) == 1


def test_heal_outside_compress_apply_says_how_to_run_it():
    ctx = ApplyContext(tokenizer=tiny_tokenizer(), calib=CALIB)
    with pytest.raises(MoveError, match="greenopt.compress.apply"):
        handler("heal").apply(tiny_llama(), HEAL, ctx)


def test_heal_without_a_tokenizer_is_refused():
    with pytest.raises(MoveError, match="pass tokenizer="):
        apply(tiny_llama(), Variant(steps=(DepthStep(layers="1"), HEAL)))


def test_heal_step_validates_its_fields():
    assert Variant.model_validate({"steps": [{"kind": "heal"}]}).steps[0] == HealStep()
    for bad in ({"max_seconds": 0}, {"steps": 0}, {"mode": "qlora"}, {"rank": 0}, {"temperature": 0}, {"stepz": 3}):
        with pytest.raises(ValidationError):
            HealStep(**bad)


def test_variant_hashes_without_heal_are_unchanged():
    assert Variant(steps=(DepthStep(drop=8),)).hash == "e35640ecf231"
    assert Variant(steps=(WidthStep(ffn_keep=0.5), QuantizeStep(method="rtn", bits=8, group_size=32))).hash \
        == "fc07028e322a"
    assert Variant(steps=(PruneStep(sparsity=0.5),)).hash == "bf3367172f86"
    assert Variant().hash == "4f53cda18c2b"
    assert Variant(steps=(DepthStep(drop=8), HealStep())).hash != "e35640ecf231"
    # full-mode heal hashes from before lora existed: rank does not count in full mode
    assert Variant(steps=(DepthStep(drop=8), HealStep())).hash == "c3c2009ef4bc"
    assert Variant(steps=(DepthStep(drop=8), HealStep(rank=4))).hash == "c3c2009ef4bc"
    lora = Variant(steps=(DepthStep(drop=8), HealStep(mode="lora")))
    assert lora.hash not in ("c3c2009ef4bc", Variant(steps=(DepthStep(drop=8), HealStep(mode="lora", rank=4))).hash)


def test_a_healed_variant_exports_and_reloads_with_the_measured_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from greenopt.ship import ExportProvenance, export, load

    variant = Variant(steps=(DepthStep(drop=1), HEAL))
    model, report = _applied(*variant.steps)
    cut, _ = _applied(DepthStep(drop=1))
    m = export(model, tiny_tokenizer(), variant, None, tmp_path / "out",
               provenance=ExportProvenance(base_model="tiny", apply_report=report))
    assert m.loader == "transformers" and m.variant == variant
    back = load(tmp_path / "out")
    assert _same_weights(back, model) and not _same_weights(back, cut)
    with torch.inference_mode():
        want = model(PROBE).logits
        assert torch.equal(back(PROBE).logits, want)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(PROBE).logits, want)


@pytest.mark.integration
def test_a_few_heal_steps_lower_the_kl_of_a_depth_cut_default_model():
    import re

    from greenopt.models import load_model

    model, tok, _ = load_model("default", dtype="float32", device="cpu")
    step = HealStep(steps=3, batch=2, seq_len=64, heldout_rows=4)
    report = apply(model, Variant(steps=(DepthStep(layers="10-17"), step)), tokenizer=tok)
    kl_before, kl_after = map(float, re.search(r"KL ([0-9.]+) -> ([0-9.]+)", report.steps[1].summary).groups())
    assert kl_before > 0.5 and kl_after < 0.9 * kl_before, report.steps[1].summary
    assert not model.training and all(p.grad is None for p in model.parameters())


LORA = HEAL.model_copy(update={"mode": "lora", "rank": 4, "lr": 3e-3})


def test_lora_heal_lowers_kl_trains_only_adapters_and_merges_them():
    teacher = tiny_llama()
    cut, _ = _applied(DepthStep(drop=1))
    healed, report = _applied(DepthStep(drop=1), LORA)
    assert _held_kl(teacher, healed) < 0.8 * _held_kl(teacher, cut)
    assert all(not m._forward_hooks for m in healed.modules())  # merged: an ordinary model again
    assert sorted(n for n, _ in healed.named_parameters()) == sorted(n for n, _ in cut.named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(dict(healed.named_parameters())[name], dict(cut.named_parameters())[name])
    rep = report.steps[1]
    linears = 3 * 7  # 3 layers left, 7 Linears each
    assert any(f"rank-4 adapters on {linears} decoder Linears, merged" in n for n in rep.notes), rep.notes
    assert rep.params_after == rep.params_before


def test_lora_heal_is_seeded_and_keeps_pruned_zeros():
    a, _ = _applied(PruneStep(sparsity=0.5, method="magnitude"), LORA)
    b, _ = _applied(PruneStep(sparsity=0.5, method="magnitude"), LORA)
    pruned, _ = _applied(PruneStep(sparsity=0.5, method="magnitude"))
    assert _same_weights(a, b) and not _same_weights(a, pruned)
    for (n, w), (_, w0) in zip(a.named_parameters(), pruned.named_parameters(), strict=True):
        if n.endswith("proj.weight"):
            assert torch.equal(w == 0, w0 == 0), n


def test_lora_outputs_before_merging_equal_the_merged_model():
    """The hook adds exactly what the merge writes: the trained function is the exported one."""
    from greenopt.compress.heal import _add_adapters, _merge

    model = tiny_llama()
    adapters = _add_adapters(model, LORA, {})
    with torch.no_grad():
        for ad in adapters:
            ad.b.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        hooked = model(PROBE).logits
    _merge(adapters, {})
    with torch.no_grad():
        merged = model(PROBE).logits
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
    assert not torch.equal(merged, tiny_llama()(PROBE).logits.detach())
