"""The KL fidelity look (greenopt.evaluate.fidelity) and paired accuracy differences, on tiny llamas."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from greenopt.config import EvalSpec, KLSpec, validated
from greenopt.errors import ConfigError
from greenopt.evaluate import evaluate, fidelity
from greenopt.evaluate.fidelity import (
    baseline_reference,
    kl_look,
    paired_difference,
    weights_fingerprint,
)
from greenopt.runtimes import as_runtime
from greenopt.testing import tiny_llama, tiny_tokenizer

SPEC = KLSpec(windows=6, tokens=48, top_k=8, seed=0)


def _peaked(seed: int = 0) -> torch.nn.Module:
    """A tiny llama with a sharpened head: its top-8 tokens hold most, not all, of the mass."""
    model = tiny_llama(seed=seed, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


def _noisy(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """A copy with the same seeded noise direction, ``scale`` times each weight's std."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return out


def _exact_kl(base: torch.nn.Module, cand: torch.nn.Module, ids: torch.Tensor) -> float:
    """Full-vocabulary KL(base || cand) per token, computed directly in float64."""
    with torch.inference_mode():
        lp = base(ids, use_cache=False).logits.double().log_softmax(-1)
        lq = cand(ids, use_cache=False).logits.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.fixture(autouse=True)
def _fresh_memory():
    fidelity.clear_memory_cache()
    yield
    fidelity.clear_memory_cache()


@pytest.fixture(scope="module")
def base():
    return _peaked()


@pytest.fixture
def counted(monkeypatch):
    """Counts the reference computations (the baseline forward passes)."""
    calls = []
    real = fidelity._compute_reference

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(fidelity, "_compute_reference", counting)
    return calls


def test_a_model_against_itself_is_zero(base, tmp_path):
    tok = tiny_tokenizer()
    ref = baseline_reference(base, tok, SPEC, directory=tmp_path)
    assert ref.top_ids.shape == (6, 48, 8) and ref.top_logp.dtype == ref.rest_logp.dtype == torch.float32
    look = kl_look(copy.deepcopy(base), ref, tok)
    assert abs(look.kl_nats_per_token) < 1e-6 and abs(look.window_kl_max_nats_per_token) < 1e-6
    assert look.tokens == 6 * 48 and look.windows == 6 and look.top_k == 8 and look.reference_key == ref.key
    assert kl_look(as_runtime(base, tok), ref).kl_nats_per_token == pytest.approx(0.0, abs=1e-6)  # a Runtime


def test_kl_grows_with_the_noise_in_the_weights(base, tmp_path):
    tok = tiny_tokenizer()
    ref = baseline_reference(base, tok, SPEC, directory=tmp_path)
    looks = [kl_look(_noisy(base, s), ref, tok) for s in (0.01, 0.04, 0.16)]
    kls = [x.kl_nats_per_token for x in looks]
    assert 1e-5 < kls[0] < kls[1] < kls[2], kls
    for x in looks:
        assert x.kl_nats_per_token <= x.window_kl_max_nats_per_token and x.position_kl_p99_nats > x.kl_nats_per_token


def test_coarsened_kl_is_a_lower_bound_that_closes_as_k_nears_the_vocabulary(base, tmp_path):
    tok = tiny_tokenizer()
    cand = _noisy(base, 0.08)
    vocab = len(tok)
    coarse = {}
    for k in (1, 8, vocab - 4, vocab):
        ref = baseline_reference(base, tok, SPEC.model_copy(update={"top_k": k}), directory=tmp_path)
        coarse[k] = kl_look(cand, ref, tok).kl_nats_per_token
    exact = _exact_kl(base, cand, ref.input_ids)
    mass8 = float(baseline_reference(base, tok, SPEC, directory=tmp_path).top_logp.exp().sum(-1).mean())
    assert 0.5 < mass8 < 0.99  # the top 8 leave a real remainder: the bound is not trivially tight
    assert coarse[1] < coarse[8] < exact  # strictly below while the remainder pools real mass
    assert coarse[8] > 0.3 * exact
    assert coarse[vocab - 4] <= exact * (1 + 1e-6) and coarse[vocab - 4] == pytest.approx(exact, rel=1e-3)
    assert coarse[vocab] == pytest.approx(exact, rel=1e-5)


def test_the_look_is_the_kl_of_the_top_k_plus_remainder_distributions(base, tmp_path):
    """Checked against the (k+1)-outcome distributions built directly from the full softmaxes."""
    tok = tiny_tokenizer()
    ref = baseline_reference(base, tok, SPEC, directory=tmp_path)
    cand = _noisy(base, 0.08)
    with torch.inference_mode():
        p = base(ref.input_ids, use_cache=False).logits.double().softmax(-1)
        q = cand(ref.input_ids, use_cache=False).logits.double().softmax(-1)
    top = p.topk(8, dim=-1).indices
    p8, q8 = p.gather(-1, top), q.gather(-1, top)
    pb = torch.cat([p8, 1 - p8.sum(-1, keepdim=True)], -1)
    qb = torch.cat([q8, 1 - q8.sum(-1, keepdim=True)], -1)
    want = float((pb * (pb.log() - qb.log())).sum(-1).mean())
    assert kl_look(cand, ref, tok).kl_nats_per_token == pytest.approx(want, rel=1e-4)


def test_rows_are_scored_in_chunks_with_the_same_result(base, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    ref = baseline_reference(base, tok, SPEC, directory=tmp_path)
    cand = _noisy(base, 0.04)
    whole = kl_look(cand, ref, tok).kl_nats_per_token
    rows = []
    runtime = as_runtime(cand, tok)
    real = runtime.logits
    monkeypatch.setattr(runtime, "logits", lambda ids: rows.append(ids.shape[0]) or real(ids))
    monkeypatch.setattr(fidelity, "_CHUNK_FLOATS", 2 * 48 * len(tok))  # two windows a chunk
    assert kl_look(runtime, ref).kl_nats_per_token == pytest.approx(whole, rel=1e-6)
    assert rows == [1, 2, 2, 1]


def test_a_candidate_with_nan_logits_is_infinitely_far(base, tmp_path):
    tok = tiny_tokenizer()
    ref = baseline_reference(base, tok, SPEC, directory=tmp_path)
    broken = copy.deepcopy(base)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    assert kl_look(broken, ref, tok).kl_nats_per_token == math.inf


def test_a_second_call_hits_the_cache_and_a_reload_from_disk_is_identical(base, tmp_path, counted):
    tok = tiny_tokenizer()
    first = baseline_reference(base, tok, SPEC, directory=tmp_path)
    assert baseline_reference(base, tok, SPEC, directory=tmp_path) is first and len(counted) == 1
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"{first.key}.safetensors"]  # no temp file left behind
    fidelity.clear_memory_cache()
    again = baseline_reference(copy.deepcopy(base), tok, SPEC, directory=tmp_path)
    assert len(counted) == 1 and again is not first and again.key == first.key and again.vocab == first.vocab
    for name, t in first.tensors().items():
        assert torch.equal(t, again.tensors()[name]) and t.dtype == again.tensors()[name].dtype, name


def test_an_unreadable_disk_copy_is_recomputed(base, tmp_path, counted):
    tok = tiny_tokenizer()
    ref = baseline_reference(base, tok, SPEC, directory=tmp_path)
    (tmp_path / f"{ref.key}.safetensors").write_bytes(b"torn")
    fidelity.clear_memory_cache()
    again = baseline_reference(base, tok, SPEC, directory=tmp_path)
    assert len(counted) == 2 and torch.equal(again.top_logp, ref.top_logp)


def test_the_key_changes_when_one_weight_changes(base, tmp_path, counted):
    tok = tiny_tokenizer()
    ref = baseline_reference(base, tok, SPEC, directory=tmp_path)
    edited = copy.deepcopy(base)
    assert weights_fingerprint(edited) == weights_fingerprint(base)
    with torch.no_grad():
        edited.model.layers[2].mlp.down_proj.weight[5, 7] += 1e-3
    assert weights_fingerprint(edited) != weights_fingerprint(base)
    other = baseline_reference(edited, tok, SPEC, directory=tmp_path)
    assert other.key != ref.key and len(counted) == 2
    # a different text, k or seed is a different reference too
    keys = {baseline_reference(base, tok, s, directory=tmp_path).key
            for s in (SPEC.model_copy(update={"top_k": 9}), SPEC.model_copy(update={"seed": 1}))}
    assert len(keys | {ref.key}) == 3


def test_paired_difference_on_a_hand_computed_example():
    cand, basel = [1, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    # d = [1, 0, 1, 0, 0]: mean 0.4, sample var 1.2 / 4 = 0.3, stderr sqrt(0.3 / 5)
    p = paired_difference(cand, basel)
    assert p.n == 5 and p.diff == pytest.approx(0.4)
    assert p.stderr == pytest.approx(math.sqrt(0.3 / 5)) and p.z == pytest.approx(0.4 / math.sqrt(0.06))
    same = paired_difference([1, 0, 1], [1, 0, 1])
    assert (same.diff, same.stderr, same.z) == (0.0, 0.0, 0.0)
    shifted = paired_difference([0.5, 0.7], [0.0, 0.2])
    assert shifted.diff == pytest.approx(0.5) and shifted.stderr == pytest.approx(0.0, abs=1e-12)
    assert paired_difference([0, 0, 0], [1, 1, 1]).z == -math.inf
    with pytest.raises(ConfigError, match="same items"):
        paired_difference([1, 0], [1, 0, 1])
    with pytest.raises(ConfigError, match="at least 2"):
        paired_difference([1], [0])


@pytest.mark.parametrize("field,value", [("windows", 0), ("tokens", 1), ("top_k", 0), ("seed", -1),
                                         ("top_k", 10**6), ("topk", 8)])
def test_bad_kl_specs_are_rejected(field, value):
    with pytest.raises(ConfigError, match=field):
        validated(KLSpec, {field: value})


def test_top_k_beyond_the_vocabulary_and_a_foreign_vocabulary_are_one_line_errors(base, tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"top_k 400 exceeds the vocabulary \(320\)"):
        baseline_reference(base, tok, SPEC.model_copy(update={"top_k": 400}), directory=tmp_path)
    ref = baseline_reference(base, tok, SPEC, directory=tmp_path)
    with pytest.raises(ConfigError, match="vocabulary"):
        kl_look(tiny_llama(vocab=400), ref, tok)
    with pytest.raises(ConfigError, match="tokenizer"):
        kl_look(base, ref)


def test_evaluate_keeps_per_item_values_only_when_asked():
    model, tok = tiny_llama(), tiny_tokenizer()
    spec = EvalSpec(tasks=("arc_easy",), limit=6, seed=3, batch_size=4)
    kept = evaluate(model, tok, spec, keep_items=True).score("arc_easy")
    assert kept.items is not None and len(kept.items) == kept.n == 6 and set(kept.items) <= {0.0, 1.0}
    assert sum(kept.items) / 6 == pytest.approx(kept.value)
    plain = evaluate(model, tok, spec).score("arc_easy")
    assert plain.items is None and plain.value == kept.value and plain.stderr == kept.stderr
    p = paired_difference(kept.items, kept.items)
    assert p.diff == 0.0 and p.n == 6


# ---------------------------------------------------------------------------- the KL rung in the search


def test_kl_cut_for_drop_follows_the_measured_mapping():
    from greenopt.evaluate.fidelity import kl_cut_for_drop

    cuts = [kl_cut_for_drop(d) for d in (0.01, 0.02, 0.05, 0.10)]
    assert cuts == sorted(cuts) and 2.0 < kl_cut_for_drop(0.05) < 3.0  # twice 5 points: about 2.6 nats


def test_search_cuts_on_kl_derived_from_max_drop_or_set_explicitly():
    from greenopt.config import FidelitySpec, SearchSpec
    from greenopt.label import goal, load_scheme
    from greenopt.records import QuickLook
    from greenopt.search.runner import cuts_for

    eu = load_scheme("relative-eu")
    auto = cuts_for(SearchSpec(max_drop=0.05), goal(eu, "A", 0.05))
    assert auto.kl_nats is not None and "derived from max_drop 0.05" in auto.kl_source
    assert "KL: 4 nats/token" in auto(QuickLook(kl_nats_per_token=4.0))
    assert auto(QuickLook(kl_nats_per_token=2.0)) is None  # hqq 3b's KL: over the budget, left to accuracy
    assert auto(QuickLook(kl_nats_per_token=0.1)) is None
    assert cuts_for(SearchSpec(), goal(eu, "A", None)).kl_nats is None  # no budget: KL recorded, no KL cut
    fixed = cuts_for(SearchSpec(fidelity=FidelitySpec(kl_cut=0.3)), goal(eu, "A", None))
    assert fixed.kl_nats == 0.3 and "fidelity.kl_cut" in fixed(QuickLook(kl_nats_per_token=0.5))
    off = cuts_for(SearchSpec(max_drop=0.05, fidelity=FidelitySpec(kl=None)), goal(eu, "A", 0.05))
    assert off.kl_nats is None


def test_the_runner_looks_at_kl_first_and_prunes_on_it(tiny_dir):
    from greenopt.config import DepthStep, EvalSpec, FidelitySpec, SearchSpec, Variant
    from greenopt.search.runner import Cuts, TransformersRunner
    from greenopt.testing import FakeMeter, tiny_llama, tiny_tokenizer

    spec = SearchSpec(model=str(tiny_dir), fidelity=FidelitySpec(
        kl=KLSpec(windows=2, tokens=16, top_k=8), perplexity_windows=0, quick_protocol=None, protocol="smoke",
        eval=EvalSpec(tasks=("arc_easy",), limit=2)))
    runner = TransformersRunner(spec, model=tiny_llama(), tokenizer=tiny_tokenizer(), meter=FakeMeter())
    runner.prepare()
    out = runner.run(Variant(steps=(DepthStep(drop=2),)), cut=Cuts(kl_nats=1e-9, kl_source=" (test)"))
    assert out.pruned and out.pruned.startswith("KL: ") and out.quick.kl_nats_per_token > 0
    assert "kl_s" in out.durations_s and out.comparison is None
    kept = runner.run(Variant(steps=(DepthStep(drop=1),)), cut=Cuts(kl_nats=1e9))
    assert kept.pruned is None and kept.comparison is not None and kept.quick.kl_nats_per_token > 0
