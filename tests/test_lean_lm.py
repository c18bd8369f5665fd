"""The lean lm-eval model (greenopt.evaluate.lean_lm): HFLM's scores, logits only where requests need them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import LlamaForCausalLM

from greenopt.compress import apply
from greenopt.compress.calibration import capture, input_feature_norms, run_batches
from greenopt.config import EvalSpec, KLSpec, QuantizeStep, Target, Variant
from greenopt.errors import ConfigError
from greenopt.evaluate import _untied_heads_kept, evaluate, fidelity
from greenopt.evaluate import lean_lm as lean
from greenopt.evaluate.lean_lm import lean_lm, logprob_chunks, token_logprobs
from greenopt.evaluate.runtime_lm import runtime_lm
from greenopt.runtimes import TransformersRuntime
from greenopt.testing import tiny_llama, tiny_tokenizer

PAIRS = [("The quick brown fox", " jumps over the lazy dog."), ("Energy is measured in", " joules"),
         ("Energy is measured in", " watts"), ("Energy is measured in", " w"), ("", "A language model predicts"),
         ("Compression removes bits, ", "layers or experts"), ("The", " quick"), ("The", " the"), ("The", " in")]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6, "Energy is measured in joules, power in watts.", ""]


def _requests(kind: str, args: list) -> list[Instance]:
    return [Instance(kind, {}, a if isinstance(a, tuple) else (a,), i) for i, a in enumerate(args)]


def _hflm(model, batch_size: int = 3, **kw):
    from lm_eval.models.huggingface import HFLM

    with _untied_heads_kept(model):  # HFLM would re-tie (or fail on) a separately compressed head
        return HFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=batch_size, **kw)


def _assert_same(a, b, tol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, abs=tol) and ga == gb


class _Scaled(LlamaForCausalLM):
    """A head with a logit scale after lm_head (as Cohere's): the generic head path cannot reproduce it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


class _ScaledNoKeep(_Scaled):
    """The same, and its forward takes no ``logits_to_keep``."""

    def forward(self, input_ids=None, use_cache=None, **kwargs):
        if "logits_to_keep" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
        return super().forward(input_ids=input_ids, use_cache=use_cache, **kwargs)


def _as(cls, model):
    model.__class__ = cls
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# ---------------------------------------------------------------------------- equal to HFLM


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_loglikelihood_equals_hflm(model, batch_size):
    reqs = _requests("loglikelihood", PAIRS)
    want = _hflm(model, batch_size).loglikelihood(reqs, disable_tqdm=True)
    _assert_same(want, lean_lm(model, tiny_tokenizer(), batch_size).loglikelihood(reqs, disable_tqdm=True))


def test_one_text_split_twice_is_scored_at_each_continuations_own_positions(model):
    """Both splits share one forward. HFLM 0.4.13 scores the shorter continuation of such a group at
    the first positions of the longer one (its ``gather`` takes leading positions; only its greedy
    check takes trailing ones); scored alone, each request gets what the lean model gives it."""
    pairs = [("The quick brown", " fox jumps"), ("The quick brown fox", " jumps")]
    got = lean_lm(model, tiny_tokenizer(), 3).loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    hf = _hflm(model)
    alone = [hf.loglikelihood(_requests("loglikelihood", [p]), disable_tqdm=True)[0] for p in pairs]
    _assert_same(alone, got)
    together = hf.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    assert together[0] == pytest.approx(alone[0], abs=1e-4) and together[1][0] != pytest.approx(alone[1][0], abs=1e-2)


def test_truncation_to_the_context_window_keeps_the_continuation_as_hflm(model):
    reqs = _requests("loglikelihood", [(TEXTS[0], " jumps over the lazy dog."), (TEXTS[1] * 3, " watts")])
    want = _hflm(model, max_length=20).loglikelihood(reqs, disable_tqdm=True)
    _assert_same(want, lean_lm(model, tiny_tokenizer(), 3, max_length=20).loglikelihood(reqs, disable_tqdm=True))
    with pytest.raises(ConfigError, match="exceeds the model's context of 4 tokens"):
        lean_lm(model, tiny_tokenizer(), 3, max_length=4).loglikelihood(reqs, disable_tqdm=True)


@pytest.mark.parametrize("max_length", [16, 512])
def test_rolling_loglikelihood_equals_hflm(model, max_length):
    reqs = _requests("loglikelihood_rolling", TEXTS)
    want = _hflm(model, batch_size=2, max_length=max_length).loglikelihood_rolling(reqs, disable_tqdm=True)
    got = lean_lm(model, tiny_tokenizer(), 2, max_length=max_length).loglikelihood_rolling(reqs)
    assert got[2] == want[2] == 0.0 and got == pytest.approx(want, abs=1e-4)


def test_evaluate_scores_as_hflm_did(model, monkeypatch):
    spec = EvalSpec(tasks=("arc_easy", "piqa", "wikipedia"), limit=5, seed=3, batch_size=4)
    monkeypatch.setenv("GREENOPT_EVAL_LM", "hflm")
    by_hflm = evaluate(model, tiny_tokenizer(), spec, keep_items=True)
    monkeypatch.delenv("GREENOPT_EVAL_LM")
    by_lean = evaluate(model, tiny_tokenizer(), spec, keep_items=True)
    for a, b in zip(by_hflm.scores, by_lean.scores, strict=True):
        assert (a.task, a.metric, a.n, a.items) == (b.task, b.metric, b.n, b.items)
        assert a.value == pytest.approx(b.value, rel=1e-4)
    monkeypatch.setenv("GREENOPT_EVAL_LM", "fast")
    with pytest.raises(ConfigError, match="GREENOPT_EVAL_LM='fast': use 'lean'"):
        evaluate(model, tiny_tokenizer(), spec)


def test_packed_low_bit_and_bf16_models_score_as_hflm():
    m = tiny_llama()
    apply(m, Variant(steps=[QuantizeStep(method="rtn", bits=4, group_size=32,
                                         target=Target(include=("*",), exclude=()))]))  # the head too
    reqs = _requests("loglikelihood", PAIRS)
    _assert_same(_hflm(m).loglikelihood(reqs, disable_tqdm=True),
                 lean_lm(m, tiny_tokenizer(), 3).loglikelihood(reqs, disable_tqdm=True))
    m16 = tiny_llama().to(torch.bfloat16)
    lm = lean_lm(m16, tiny_tokenizer(), 3)
    _assert_same(_hflm(m16, softmax_dtype=torch.float32).loglikelihood(reqs, disable_tqdm=True),
                 lm.loglikelihood(reqs, disable_tqdm=True), tol=1e-3)
    assert lm._logits.mode == "head"


def test_greedy_generation_matches_hflm(model):
    reqs = _requests("generate_until", [("The quick brown", {"until": ["."], "max_gen_toks": 12, "do_sample": False}),
                                        ("Energy is", {"until": "\n", "max_gen_toks": 20})])
    assert lean_lm(model, tiny_tokenizer(), 1).generate_until(reqs) == _hflm(model, 1).generate_until(
        reqs, disable_tqdm=True)
    sampled = _requests("generate_until", [("The", {"do_sample": True})])
    with pytest.raises(ConfigError, match="do_sample: false"):
        lean_lm(model, tiny_tokenizer(), 1).generate_until(sampled)


# ---------------------------------------------------------------------------- the paths


def test_the_probe_picks_the_first_path_that_reproduces_the_forward(model):
    reqs = _requests("loglikelihood", PAIRS)
    want = lean_lm(model, tiny_tokenizer(), 3)
    base = want.loglikelihood(reqs, disable_tqdm=True)
    assert want._logits.mode == "head"
    for cls, mode in ((_Scaled, "keep"), (_ScaledNoKeep, "full")):
        scaled = _as(cls, copy.deepcopy(model))
        lm = lean_lm(scaled, tiny_tokenizer(), 3)
        got = lm.loglikelihood(reqs, disable_tqdm=True)
        assert lm._logits.mode == mode
        _assert_same(_hflm(scaled).loglikelihood(reqs, disable_tqdm=True), got)
        assert all(g[0] != pytest.approx(b[0], abs=1e-3) for g, b in zip(got, base))  # the scale mattered


@pytest.mark.parametrize("mode", ["head", "keep", "full"])
def test_every_path_scores_the_same(model, mode, monkeypatch):
    reqs = _requests("loglikelihood", PAIRS)
    want = _hflm(model).loglikelihood(reqs, disable_tqdm=True)
    monkeypatch.setattr(lean, "_probe", lambda m: (mode, len(tiny_tokenizer())))
    lm = lean_lm(model, tiny_tokenizer(), 3)
    _assert_same(want, lm.loglikelihood(reqs, disable_tqdm=True))
    assert lm._logits.mode == mode


def test_the_head_sees_only_the_scored_positions_in_bounded_chunks(model, monkeypatch):
    rows: list[int] = []
    reqs = _requests("loglikelihood", PAIRS)
    want = lean_lm(model, tiny_tokenizer(), 8).loglikelihood(reqs, disable_tqdm=True)
    vocab = len(tiny_tokenizer())
    monkeypatch.setattr(lean, "CHUNK_FLOATS", 3 * vocab)
    lm = lean_lm(model, tiny_tokenizer(), 8)
    _ = lm._logits  # probe first, outside the count
    seen = []
    score = lm._loglikelihood_tokens
    monkeypatch.setattr(lm, "_loglikelihood_tokens", lambda r, **kw: seen.extend(r) or score(r, **kw))
    handle = model.lm_head.register_forward_hook(lambda m, a, out: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    try:
        got = lm.loglikelihood(reqs, disable_tqdm=True)
    finally:
        handle.remove()
    _assert_same(want, got)
    kept: dict[tuple[int, ...], int] = {}  # one row per context + continuation[:-1], its longest continuation
    for _, ctx, cont in seen:
        key = (*ctx, *cont[:-1])
        kept[key] = max(kept.get(key, 0), len(cont))
    assert len(kept) < len(PAIRS)  # " the" and " in" after "The": one row
    assert sum(rows) == sum(kept.values()) < sum(len(c) + len(k) for _, c, k in seen) and max(rows) <= 3


# ---------------------------------------------------------------------------- position chunks


class _Elsewhere(TransformersRuntime):
    """A runtime whose own ``logits`` is used (not the transformers fast path)."""

    name = "elsewhere"

    def logits(self, input_ids):
        return super().logits(input_ids)


def test_logprob_chunks_are_the_full_log_softmax(model, monkeypatch):
    tok = tiny_tokenizer()
    ids = torch.randint(1, len(tok), (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits.float().log_softmax(-1).reshape(-1, len(tok))
    for rt in (TransformersRuntime(model, tok), _Elsewhere(model, tok)):
        spans = []
        got = torch.empty_like(full)
        for span, lp in logprob_chunks(rt, ids, max_floats=7 * len(tok)):
            spans.append(span.stop - span.start)
            got[span] = lp
        assert torch.allclose(got, full, atol=1e-5)
        assert sum(spans) == ids.numel()
        assert max(spans) <= 7
    lp = token_logprobs(TransformersRuntime(model, tok), ids)
    want = full.view(5, 24, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert lp.shape == (5, 23) and torch.allclose(lp, want, atol=1e-5)


def test_the_kl_look_is_the_same_through_either_path(tmp_path):
    tok = tiny_tokenizer()
    fidelity.clear_memory_cache()
    spec = KLSpec(windows=4, tokens=32, top_k=8)
    base, cand = tiny_llama(), tiny_llama(seed=1)
    ref = fidelity.baseline_reference(base, tok, spec, directory=tmp_path)
    fast = fidelity.kl_look(TransformersRuntime(cand, tok), ref)
    slow = fidelity.kl_look(_Elsewhere(cand, tok), ref)
    fidelity.clear_memory_cache()
    assert fast.kl_nats_per_token == pytest.approx(slow.kl_nats_per_token, rel=1e-5)
    assert fast.kl_nats_per_token > 0 and math.isfinite(fast.kl_nats_per_token)


def test_the_runtime_lm_shares_the_requests_and_batches_equal_lengths(model):
    seen = []

    class Counting(_Elsewhere):
        def logits(self, input_ids):
            seen.append(tuple(input_ids.shape))
            return super().logits(input_ids)

    reqs = _requests("loglikelihood", PAIRS)
    got = runtime_lm(Counting(model, tiny_tokenizer()), tiny_tokenizer(), 3).loglikelihood(reqs, disable_tqdm=True)
    _assert_same(_hflm(model).loglikelihood(reqs, disable_tqdm=True), got)
    assert seen and all(b <= 3 for b, _ in seen)


# ---------------------------------------------------------------------------- calibration forwards


def test_calibration_forwards_stop_before_the_head_unless_it_is_watched():
    model = tiny_llama()
    batch = torch.randint(1, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    layer_rows = []
    with capture({"l0": model.model.layers[0].mlp}, lambda n, m, i, o: layer_rows.append(i[0].shape[:2])):
        real = model.lm_head.forward
        model.lm_head.forward = lambda x: calls.append(x.shape) or real(x)
        run_batches(model, batch, rows_per_step=2)
    assert calls == [] and layer_rows == [(2, 16), (1, 16)]
    del model.lm_head.forward
    with_head = input_feature_norms(model, {"lm_head": model.lm_head, "down": model.model.layers[0].mlp.down_proj},
                                    batch)
    h = []
    with capture({"n": model.model.norm}, lambda n, m, i, o: h.append(o.reshape(-1, o.shape[-1]))):
        run_batches(model, batch)
    assert torch.allclose(with_head["lm_head"], torch.cat(h).float().pow(2).sum(0).sqrt(), rtol=1e-5)


def test_calibration_forwards_run_through_a_tied_packed_embedding_and_head():
    model = tiny_llama()
    apply(model, Variant(steps=[QuantizeStep(method="rtn", bits=8, group_size=32,
                                             target=Target(include=("*",), exclude=()))]))
    assert model.get_output_embeddings() is model.get_input_embeddings()  # one module, ids in and hidden states in
    seen = []
    batch = torch.randint(1, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    with capture({"norm": model.model.norm}, lambda n, m, i, o: seen.append(o.shape)):
        run_batches(model, batch)
    assert seen == [(2, 8, 64)]
