"""The search space: parameters <-> Variant, identity in the space, determinism, groups."""

import importlib.util

import optuna
import pytest

from greenopt.config import QuantizeStep, SpaceSpec, Variant, parse_layers, validated
from greenopt.errors import ConfigError
from greenopt.search.space import baseline_params, build, dims, layer_groups, sample

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _random_variants(spec: SpaceSpec, num_layers: int, n: int, seed: int = 0):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    out = []
    for _ in range(n):
        t = study.ask()
        v = sample(t, spec, num_layers)
        out.append((dict(t.params), v))
        study.tell(t, [0.0, 0.0])
    return out


def test_baseline_params_build_the_empty_variant():
    for spec in (SpaceSpec(), SpaceSpec(moefy_experts=(4, 8), heads_keep=(0.5,), lm_head_bits=(8,), methods=("hqq", "rtn"))):
        assert build(baseline_params(spec, 30), spec, 30) == Variant()


def test_enqueued_baseline_params_are_honoured_by_the_trial():
    spec = SpaceSpec(moefy_experts=(4,), lm_head_bits=(8,))
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(baseline_params(spec, 12))
    assert sample(study.ask(), spec, 12).is_baseline


def test_variant_is_a_pure_function_of_the_params():
    spec = SpaceSpec(moefy_experts=(4, 8))
    for params, v in _random_variants(spec, 12, 40):
        assert build(params, spec, 12).hash == v.hash
        validated(Variant, v.model_dump(mode="json"))  # round-trips through the validator


def test_irrelevant_params_do_not_change_the_variant():
    spec = SpaceSpec()
    p = baseline_params(spec, 12)
    a = build({**p, "prune": "none", "prune.sparsity": 0.1}, spec, 12)
    b = build({**p, "prune": "none", "prune.sparsity": 0.45}, spec, 12)
    assert a == b == Variant()
    two4 = build({**p, "prune": "2:4", "prune.sparsity": 0.3}, spec, 12)
    assert two4.steps[0].pattern == "2:4" and two4.steps[0].sparsity == 0.5


def test_disabled_dimensions_leave_only_the_baseline():
    spec = SpaceSpec(bits=(), prune=(), depth_drop_max=0, ffn_keep_min=1.0, dtypes=())
    assert dims(spec, 30) == []
    assert build({}, spec, 30) == Variant()


def test_identity_is_always_a_choice_and_keeps_stay_on_the_grid():
    spec = SpaceSpec(bits=(4, 2), ffn_keep_min=0.3, keep_step=0.125)
    d = {x.name: x for x in dims(spec, 30)}
    assert 16 in d["bits.g0.attn"].choices
    assert d["width.ffn_keep"].low == pytest.approx(0.375) and d["width.ffn_keep"].high == 1.0
    assert d["depth.drop"].high == int(0.25 * 30)


def test_uniform_bits_give_one_step_without_overrides():
    spec = SpaceSpec(split_attn_ffn=True)
    p = {**baseline_params(spec, 12), **{f"bits.g{g}.{x}": 4 for g in range(3) for x in ("attn", "ffn")}}
    (step,) = build(p, spec, 12).steps
    assert isinstance(step, QuantizeStep) and step.bits == 4 and step.overrides == ()


def test_mixed_bits_use_the_most_common_width_and_group_overrides():
    spec = SpaceSpec()
    p = {**baseline_params(spec, 12), "bits.g0.attn": 8, "bits.g0.ffn": 4, "bits.g1.attn": 4,
         "bits.g1.ffn": 4, "bits.g2.attn": 16, "bits.g2.ffn": 2}
    (step,) = build(p, spec, 12).steps
    assert step.bits == 4
    got = {(o.target.include, o.target.layers, o.bits) for o in step.overrides}
    assert got == {(("*self_attn*",), "0-3", 8), (("*self_attn*",), "8-11", 16), (("*mlp*",), "8-11", 2)}


def test_groups_are_computed_after_the_depth_cut():
    spec = SpaceSpec()
    p = {**baseline_params(spec, 12), "depth.drop": 3, "bits.g2.ffn": 4}
    v = build(p, spec, 12)
    assert [s.kind for s in v.steps] == ["depth", "quantize"]
    layers = {i for o in v.steps[1].overrides for i in parse_layers(o.target.layers)}
    assert max(layers) == 8  # 9 layers remain


def test_lm_head_gets_its_own_step():
    spec = SpaceSpec(lm_head_bits=(8,))
    v = build({**baseline_params(spec, 12), "bits.lm_head": 8}, spec, 12)
    (step,) = v.steps
    assert step.target.include == ("lm_head",) and step.target.exclude == () and step.bits == 8


def test_layer_groups_cover_every_layer_once():
    for n in (1, 2, 5, 12, 30):
        for g in (1, 3, 4):
            ranges = layer_groups(n, g)
            covered = [i for a, b in ranges for i in range(a, b + 1)]
            assert covered == list(range(n))


def test_bad_space_fails_loudly():
    with pytest.raises(ConfigError, match="sparsity"):
        validated(SpaceSpec, {"sparsity": [0.6, 0.2]})
    with pytest.raises(ConfigError, match="bitz"):
        validated(SpaceSpec, {"bitz": [4]})


@pytest.mark.skipif(any(importlib.util.find_spec(f"greenopt.compress.{m}") is None
                        for m in ("quantize", "prune", "width", "depth")),
                    reason="compression handlers not present yet")
def test_sampled_variants_pass_the_handlers_checks():
    from greenopt.compress import ApplyContext, check
    from greenopt.testing import tiny_llama, tiny_tokenizer

    model = tiny_llama(layers=6)
    spec = SpaceSpec()
    for _, v in _random_variants(spec, 6, 15, seed=3):
        check(model, v, ApplyContext(tokenizer=tiny_tokenizer()))


def test_moefied_ffn_is_left_unquantized_so_overrides_always_match():
    from greenopt.compress import apply
    from greenopt.config import SpaceSpec
    from greenopt.search.space import build
    from greenopt.testing import tiny_llama, tiny_tokenizer

    spec = SpaceSpec(bits=(16, 4), methods=("rtn",), group_size=32, layer_groups=2, prune=(),
                     moefy_experts=(4,), moefy_top_k=(2,))
    params = {"moefy.experts": 4, "moefy.top_k": 2, "bits.g0.attn": 4, "bits.g0.ffn": 4,
              "bits.g1.attn": 16, "bits.g1.ffn": 4}
    variant = build(params, spec, num_layers=4)
    quant = [s for s in variant.steps if s.kind == "quantize"]
    assert quant[0].bits == 16 and [o.target.include for o in quant[0].overrides] == [("*self_attn*",)]
    apply(tiny_llama(), variant, tokenizer=tiny_tokenizer())  # no MoveError: every override matches


def test_single_moves_are_one_move_each_on_the_grid_and_mildest_first():
    from greenopt.search.space import single_moves

    spec = SpaceSpec(bits=(8, 4), methods=("hqq", "rtn"), prune=("unstructured", "2:4"), sparsity=(0.1, 0.5),
                     depth_drop_max=0.25, ffn_keep_min=0.5, moefy_experts=(8,), moefy_top_k=(1, 2))
    variants = [build(p, spec, 30) for p in single_moves(spec, 30)]
    assert variants[-1].deploy.dtype == "bfloat16" and not variants[-1].steps  # the deployment moves come last
    variants = variants[:-1]
    kinds = [v.steps[0].kind for v in variants]
    assert all(len(v.steps) == 1 for v in variants) and len({v.hash for v in variants}) == len(variants)
    assert kinds == ["quantize"] * 4 + ["prune"] * 2 + ["depth"] * 2 + ["width", "moefy"]
    q = [(s.bits, s.method) for v in variants[:4] for s in v.steps]
    assert q == [(8, "hqq"), (8, "rtn"), (4, "hqq"), (4, "rtn")]
    assert variants[4].steps[0].sparsity == 0.3 and variants[5].steps[0].pattern == "2:4"
    assert [v.steps[0].drop for v in variants[6:8]] == [4, 7]  # an eighth, a quarter (capped at the space's 7)
    assert variants[8].steps[0].ffn_keep == 0.75
    assert (variants[9].steps[0].experts, variants[9].steps[0].top_k) == (8, 2)


def test_a_space_with_nothing_to_move_has_no_single_moves():
    from greenopt.search.space import single_moves

    spec = SpaceSpec(bits=(), prune=(), depth_drop_max=0, ffn_keep_min=1, dtypes=())
    assert single_moves(spec, 30) == []


def test_the_space_heals_structural_and_prune_moves_before_quantizing():
    from greenopt.config import HealStep

    heal = HealStep(steps=20, batch=4, seq_len=128, max_seconds=3600)
    spec = SpaceSpec(heal=heal, runtimes=("onnxruntime-genai",))
    assert ("heal", (False, True)) in [(d.name, d.choices) for d in dims(spec, 12)]
    base = baseline_params(spec, 12)
    assert base["heal"] is False and build(base, spec, 12).is_baseline
    cut = {**base, "depth.drop": 2, "bits.g0.attn": 4, "heal": True}
    assert [s.kind for s in build(cut, spec, 12).steps] == ["depth", "heal", "quantize"]
    assert build(cut, spec, 12).steps[1] == heal
    assert [s.kind for s in build({**cut, "heal": False}, spec, 12).steps] == ["depth", "quantize"]
    quant_only = {**base, "bits.g0.attn": 4, "heal": True}  # nothing to heal from: heal changes nothing
    assert build(quant_only, spec, 12) == build({**quant_only, "heal": False}, spec, 12)
    ort = build({**cut, "deploy.runtime": "onnxruntime-genai"}, spec, 12)
    assert [s.kind for s in ort.steps] == ["depth", "heal"]  # a healed checkpoint is an ordinary one
    assert "heal" not in [d.name for d in dims(SpaceSpec(), 12)]
