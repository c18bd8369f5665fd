"""Runtimes: the interface, the transformers runtime, what each runtime can realise, and lm-eval on a runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from greenopt.config import Deploy, DepthStep, EvalSpec, QuantizeStep, Variant, protocol_preset
from greenopt.errors import ConfigError
from greenopt.evaluate import evaluate
from greenopt.label.card import render_markdown
from greenopt.measure.workload import compare, measure
from greenopt.records import RuntimeDescription
from greenopt.runtimes import Runtime, TransformersRuntime, as_runtime, realise, runtime_class, unrealisable
from greenopt.testing import FakeMeter, tiny_llama, tiny_tokenizer

AVX2 = ("avx2",)
AVX512_BF16 = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")
SPR = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")


class Delegating(Runtime):
    """A runtime outside transformers for the tests: scores and generates through another runtime."""

    name = "delegating"

    def __init__(self, inner: TransformersRuntime) -> None:
        self.inner, self.calls = inner, {"generate": 0, "logits": 0}
        self.max_length = inner.max_length

    def generate(self, input_ids, new_tokens):
        self.calls["generate"] += 1
        return self.inner.generate(input_ids, new_tokens)

    def logits(self, input_ids):
        self.calls["logits"] += 1
        return self.inner.logits(input_ids)

    def describe(self) -> RuntimeDescription:
        return RuntimeDescription(name=self.name, version="0", dtype="float32", device="cpu")

    def export(self, out: Path) -> tuple[str, ...]:
        return ()


@pytest.fixture
def rt():
    return TransformersRuntime(tiny_llama(), tiny_tokenizer())


def test_generate_gives_exactly_the_new_tokens_greedily(rt):
    ids = torch.randint(3, 200, (2, 7))
    with rt.measuring():
        out = rt.generate(ids, 5)
        again = rt.generate(ids, 5)
    assert out.shape == (2, 5) and out.dtype == torch.long
    assert torch.equal(out, again)
    with torch.inference_mode():  # the first new token is the argmax of the last position's logits
        assert torch.equal(out[:, 0], rt.logits(ids)[:, -1].argmax(-1))


def test_logits_shape_and_dtype(rt):
    out = rt.logits(torch.randint(3, 200, (3, 6)))
    assert out.shape == (3, 6, rt.module.config.vocab_size) and out.dtype == torch.float32


def test_describe_names_runtime_dtype_threads_and_kernels(rt):
    d = rt.describe()
    assert (d.name, d.dtype, d.device) == ("transformers", "float32", "cpu")
    assert d.threads == torch.get_num_threads()
    assert any(k.startswith("Linear[float32] x") for k in d.kernels)
    assert "transformers" in d.line() and "float32 on cpu" in d.line()


def test_measuring_restores_training_mode(rt):
    rt.module.train()
    with rt.measuring():
        assert not rt.module.training and torch.is_inference_mode_enabled()
    assert rt.module.training


def test_as_runtime_wraps_models_and_keeps_runtimes(rt):
    assert as_runtime(rt, None) is rt
    wrapped = as_runtime(tiny_llama(), tiny_tokenizer())
    assert isinstance(wrapped, TransformersRuntime)


def test_workload_measures_through_the_runtime_it_is_given(rt):
    d = Delegating(rt)
    m = measure(d, tiny_tokenizer(), protocol_preset("smoke"), FakeMeter())
    assert m.trials and d.calls["generate"] > 0
    c = compare(rt, Delegating(rt), tiny_tokenizer(), protocol_preset("smoke"), FakeMeter())
    assert c.eei > 0


def test_export_writes_a_loadable_checkpoint(rt, tmp_path):
    from transformers import AutoModelForCausalLM

    names = rt.export(tmp_path)
    assert "config.json" in names
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 200, (1, 5))
    with torch.inference_mode():
        assert torch.allclose(back(ids).logits, rt.logits(ids), atol=1e-5)


# ---------------------------------------------------------------------------- what a runtime can realise


def test_bf16_on_cpu_only_where_the_cpu_has_it():
    d = Deploy(dtype="bfloat16")
    assert "no native kernels" in unrealisable(d, (), "cpu", AVX2)
    assert unrealisable(d, (), "cpu", AVX512_BF16) is None
    assert unrealisable(d, (), "cpu", ("asimd", "bf16")) is None
    assert unrealisable(d, (), "cuda:0", AVX2) is None


def test_fp16_on_cpu_needs_avx512_fp16():
    d = Deploy(dtype="float16")
    assert "avx512_fp16" in unrealisable(d, (), "cpu", AVX512_BF16)
    assert unrealisable(d, (), "cpu", SPR) is None


def test_onnx_runtime_realises_plain_checkpoints_only():
    d = Deploy(runtime="onnxruntime-genai", weights="int4")
    assert unrealisable(d, (DepthStep(drop=1),), "cpu", AVX2) is None
    reason = unrealisable(d, (QuantizeStep(method="rtn", bits=4),), "cpu", AVX2)
    assert "cannot realise a quantize step" in reason and "onnxruntime-genai" in reason
    assert "float32" in unrealisable(Deploy(runtime="onnxruntime-genai", dtype="bfloat16"), (), "cpu", SPR)


def test_transformers_takes_no_runtime_weight_format():
    with pytest.raises(ValueError, match="onnxruntime-genai format"):
        Deploy(weights="int4")


def test_realise_refuses_in_one_line(monkeypatch):
    monkeypatch.setattr("greenopt.runtimes.cpu_has_bf16", lambda flags=None: False)
    with pytest.raises(ConfigError, match="bfloat16 on this CPU"):
        realise(tiny_llama(), tiny_tokenizer(), Deploy(dtype="bfloat16"))


def test_realise_casts_to_the_deploy_dtype(monkeypatch):
    monkeypatch.setattr("greenopt.runtimes.cpu_has_bf16", lambda flags=None: True)
    rt = realise(tiny_llama(), tiny_tokenizer(), Deploy(dtype="bfloat16"))
    assert rt.describe().dtype == "bfloat16"
    assert rt.generate(torch.randint(3, 200, (1, 4)), 3).shape == (1, 3)


def test_missing_backend_names_the_extra(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "greenopt.runtimes.ortgenai":
            raise ModuleNotFoundError("No module named 'onnxruntime_genai'", name="onnxruntime_genai")
        return real(name, *a, **k)

    monkeypatch.setattr("greenopt.runtimes.importlib.import_module", fake)
    with pytest.raises(ConfigError, match=r"pip install 'greenopt\[ort\]'"):
        runtime_class("onnxruntime-genai")
    with pytest.raises(ConfigError, match="unknown runtime"):
        runtime_class("vllm")


def test_deploy_changes_the_variant_hash_only_when_not_the_reference():
    steps = (DepthStep(drop=1),)
    assert Variant(steps=steps).hash == Variant(steps=steps, deploy=Deploy()).hash
    assert Variant(steps=steps).hash != Variant(steps=steps, deploy=Deploy(dtype="bfloat16")).hash
    assert Variant().is_baseline and not Variant(deploy=Deploy(dtype="bfloat16")).is_baseline
    assert Deploy(runtime="onnxruntime-genai", weights="int4").describe() == "onnxruntime-genai int4 b32 acc4"


# ---------------------------------------------------------------------------- lm-eval on a runtime


def test_lm_eval_on_a_runtime_matches_hflm_on_the_same_model():
    model, tok = tiny_llama(), tiny_tokenizer()
    spec = EvalSpec(tasks=("arc_easy", "wikipedia"), limit=4, seed=3, batch_size=2)
    by_hf = evaluate(model, tok, spec)
    d = Delegating(TransformersRuntime(model, tok))
    by_runtime = evaluate(d, tok, spec)
    assert d.calls["logits"] > 0
    for a, b in zip(by_hf.scores, by_runtime.scores, strict=True):
        assert (a.task, a.metric, a.n) == (b.task, b.metric, b.n)
        assert a.value == pytest.approx(b.value, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------- assess on a deployment


def test_assess_measures_the_variant_on_its_runtime_against_the_reference(tiny_dir, monkeypatch):
    from greenopt.assess import AssessSpec, assess

    monkeypatch.setattr("greenopt.runtimes.cpu_has_bf16", lambda flags=None: True)
    variant = Variant(steps=(DepthStep(drop=1),), deploy=Deploy(dtype="bfloat16"))
    result = assess(AssessSpec(model=str(tiny_dir), variant=variant, protocol="smoke", meter="estimate",
                               eval=None, comparisons=2, cpu_watts=10))
    r = result.card.runtime
    assert (r.deployed.name, r.deployed.dtype) == ("transformers", "bfloat16")
    assert (r.baseline.name, r.baseline.dtype) == ("transformers", "float32")
    assert result.runtime.describe().dtype == "bfloat16"
    assert len(result.comparison.runs) == 2
    assert "Variant deployed on: transformers" in render_markdown(result.card)


def test_assess_refuses_what_the_runtime_cannot_realise_before_loading(monkeypatch):
    from greenopt.assess import AssessSpec, assess

    monkeypatch.setattr("greenopt.assess.load_model", lambda *a, **k: pytest.fail("must not load the model"))
    variant = Variant(steps=(QuantizeStep(method="rtn", bits=4),),
                      deploy=Deploy(runtime="onnxruntime-genai", weights="int4"))
    with pytest.raises(ConfigError, match="cannot realise a quantize step"):
        assess(AssessSpec(model="default", variant=variant, protocol="smoke", meter="estimate", eval=None,
                          cpu_watts=10))


# ---------------------------------------------------------------------------- the CLI


def test_measure_at_several_batch_sizes_writes_one_card_each(tiny_dir, tmp_path, capsys):
    from greenopt.cli import main

    out = tmp_path / "cards"
    rc = main(["measure", "--model", str(tiny_dir), "--protocol", "smoke", "--meter", "estimate", "--cpu-watts", "10",
               "--tasks", "--comparisons", "1", "--batch", "1,2", "--out", str(out), "--json"])
    assert rc == 0
    cards = json.loads(capsys.readouterr().out)["batches"]
    assert [c["card"]["protocol_id"] for c in cards] == ["GO-1/b1/p8-n4", "GO-1/b2/p8-n4"]
    assert (out / "b1" / "label.json").is_file() and (out / "b2" / "label.json").is_file()


def test_measure_runtime_flags_reach_the_card(tiny_dir, tmp_path, capsys, monkeypatch):
    from greenopt.cli import main

    monkeypatch.setattr("greenopt.runtimes.cpu_has_bf16", lambda flags=None: True)
    rc = main(["measure", "--model", str(tiny_dir), "--protocol", "smoke", "--meter", "estimate", "--cpu-watts", "10",
               "--tasks", "--comparisons", "1", "--runtime-dtype", "bfloat16", "--out", str(tmp_path), "--json"])
    assert rc == 0
    card = json.loads(capsys.readouterr().out)["card"]
    assert card["runtime"]["deployed"]["dtype"] == "bfloat16" and card["runtime"]["baseline"]["dtype"] == "float32"


def test_recipe_validate_names_the_step_a_runtime_cannot_realise(tmp_path):
    from greenopt.validate import validate_file

    bad = tmp_path / "r.yaml"
    bad.write_text("model: {id: default}\nvariant:\n  steps: [{kind: quantize, method: rtn, bits: 4}]\n"
                   "  deploy: {runtime: onnxruntime-genai, weights: int4}\n")
    report = validate_file(bad, dry_run=False)
    assert [i.path for i in report.issues] == ["variant.deploy"]
    assert "cannot realise a quantize step" in report.issues[0].message


def test_recipe_validate_says_what_a_searched_runtime_does_not_sample(tmp_path):
    from greenopt.validate import validate_file

    r = tmp_path / "s.yaml"
    r.write_text("model: {id: default}\nsearch:\n  target: A\n  space: {runtimes: [onnxruntime-genai]}\n")
    report = validate_file(r, dry_run=False)
    assert not report.issues
    assert any("quantize and MoE moves are not sampled" in n for n in report.notes)
