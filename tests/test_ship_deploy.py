"""Export and verify ship what was measured, on its runtime: bf16 weights on transformers, the
ONNX Runtime GenAI artifact itself; verify measures them against the fp32 transformers baseline."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch
from safetensors import safe_open

import greenopt.assess
import greenopt.runtimes
import greenopt.ship.exporter
import greenopt.ship.gate
from greenopt.compress import apply
from greenopt.config import CalibSpec, Deploy, DepthStep, SearchSpec, Variant, protocol_preset
from greenopt.errors import ConfigError, ModelError, WriteError
from greenopt.label.card import load_card
from greenopt.models import load_model
from greenopt.records import Comparison
from greenopt.runtimes import cast, realise
from greenopt.search.rundir import RunDir
from greenopt.ship import VerifySpec, export, export_run, load, verify
from greenopt.ship.exporter import files_sha256
from greenopt.testing import tiny_llama, tiny_tokenizer

CALIB = CalibSpec(samples=4, seq_len=32)
ORT = "onnxruntime-genai"
PROBE = torch.arange(1, 17).unsqueeze(0)
BF16 = Variant(steps=(DepthStep(drop=1),), deploy=Deploy(dtype="bfloat16"))


@pytest.fixture
def bf16_cpu(monkeypatch):
    """bf16 counts as native here, whatever this CPU has (AVX2-only machines run the test too)."""
    monkeypatch.setattr(greenopt.runtimes, "cpu_has_bf16", lambda flags=None: True)


def _comparison() -> Comparison:
    from test_verify import _measurement

    pid = protocol_preset("smoke").id
    return Comparison(eei=45.0, eei_ci=(43.0, 47.0), baseline=_measurement(1.0, (0.98, 1.02), "E1", pid),
                      candidate=_measurement(0.45, (0.43, 0.47), "E1", pid))


def _run(root, variant: Variant) -> RunDir:
    """A run folder whose study holds the baseline and one trial of ``variant``, applied as the search applies it."""
    from test_export import card_evals

    base = root / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    spec = SearchSpec(model=str(base), target="G", name="r", runs_dir=str(root / "runs"), calib=CALIB,
                      fidelity={"protocol": "smoke"})
    report = apply(cast(tiny_llama(), variant.deploy), variant, tokenizer=tiny_tokenizer(), calib=CALIB)
    from test_export_run import record_run

    rd, _ = record_run(RunDir(root / "runs" / "r"), spec, variant, report, _comparison(), card_evals())
    return rd


def _measured(root, variant: Variant):
    """The trial's candidate exactly as the search built it: base loaded fp32, cast, steps applied."""
    model, tok, _ = load_model(str(root / "base"))
    cast(model, variant.deploy)
    apply(model, variant, tokenizer=tok, calib=CALIB)
    return model, tok


def _estimate(folder, **kw) -> VerifySpec:
    return VerifySpec(source=str(folder), target="G", meter="estimate", cpu_watts=10, tasks=(), device="cpu",
                      allow_estimate=True, **kw)


class _Stop(Exception):
    pass


def _spec_of_verify(folder, monkeypatch):
    seen = []

    def fake_assess(spec, **_):
        seen.append(spec)
        raise _Stop

    monkeypatch.setattr(greenopt.ship.gate, "assess", fake_assess)
    with pytest.raises(_Stop):
        verify(_estimate(folder))
    return seen[0]


# ---------------------------------------------------------------------------- transformers, bfloat16


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    rd = _run(root, BF16)
    manifest = export_run(rd.root, root / "exp", check_reload=True)
    return root, manifest


def test_a_bf16_variant_ships_its_measured_bf16_weights(bf16_export):
    root, m = bf16_export
    folder = root / "exp"
    assert m.loader == "transformers" and m.dtype == "float32" and m.variant.deploy == BF16.deploy
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    want_model, _ = _measured(root, BF16)
    got_model = load(folder)
    assert next(got_model.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        assert torch.equal(got_model(PROBE).logits, want_model(PROBE).logits)
    runtime = load_card(folder).runtime
    assert runtime.dtype == "bfloat16"
    assert runtime.deployed.dtype == "bfloat16" and runtime.baseline.dtype == "float32"
    readme = (folder / "README.md").read_text()
    assert "The weights are bfloat16" in readme and "- Deployed on: transformers" in readme


def test_verify_of_a_bf16_export_keeps_the_baseline_float32(bf16_export, bf16_cpu, monkeypatch):
    root, m = bf16_export
    spec = _spec_of_verify(root / "exp", monkeypatch)
    assert spec.model == str(root / "exp") and spec.baseline == m.base_model and spec.artifact is None
    assert spec.dtype == "float32" and spec.variant == Variant(deploy=Deploy(dtype="bfloat16"))


def test_verify_of_a_bf16_export_measures_bf16_against_float32(bf16_export, bf16_cpu):
    root, m = bf16_export
    r = verify(_estimate(root / "exp"))
    assert r.card is not None, r.reason
    rt = r.card.runtime
    assert rt.deployed.name == "transformers" and rt.deployed.dtype == "bfloat16"
    assert rt.baseline.dtype == "float32" and "Linear[bfloat16] x" in rt.deployed.kernels[0]
    assert r.card.variant == m.variant_info and r.passed, r.reason


def test_export_refuses_a_model_not_cast_to_its_deploy_dtype(tmp_path):
    model = tiny_llama()  # float32, but the variant says it runs in bfloat16
    with pytest.raises(ConfigError, match="cast it"):
        export(model, tiny_tokenizer(), BF16, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- onnxruntime-genai


ORT_INT4 = Variant(steps=(DepthStep(drop=1),), deploy=Deploy(runtime=ORT, weights="int4", block_size=32))


@pytest.fixture(scope="module")
def ort_export(tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GREENOPT_HOME", str(tmp_path_factory.mktemp("home")))  # builds never touch the user's cache
        root = tmp_path_factory.mktemp("ort")
        rd = _run(root, ORT_INT4)
        manifest = export_run(rd.root, root / "exp", check_reload=True)
        yield root, manifest


def test_an_ort_export_is_the_runtime_artifact_with_its_manifest_and_card(ort_export):
    root, m = ort_export
    folder = root / "exp"
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "greenopt_export.json", "label.json",
            "LABEL.md", "label.svg", "README.md"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert not [p for p in root.iterdir() if ".greenopt-" in p.name]  # staged and swapped, nothing left over
    assert m.loader == ORT and "MatMulNBits int4" in m.loader_reason and m.variant.deploy == ORT_INT4.deploy
    assert m.weights_sha256 == files_sha256(folder, ORT) != files_sha256(folder)
    card = load_card(folder)
    assert card.runtime.deployed.name == ORT and card.runtime.baseline.name == "transformers"
    readme = (folder / "README.md").read_text()
    assert "og.Model(DIR)" in readme and "library_name: onnxruntime-genai" in readme
    assert "`onnxruntime-genai int4 b32 acc4`" in readme and "greenopt.load" not in readme
    with pytest.raises(ModelError, match=r"an ONNX Runtime GenAI model, not a checkpoint; load it with onnx"):
        load(folder)


def test_an_ort_export_reloads_into_the_measured_runtime(ort_export):
    from greenopt.runtimes.ortgenai import OrtGenAIRuntime

    root, m = ort_export
    measured = realise(*_measured(root, ORT_INT4), ORT_INT4.deploy, steps=ORT_INT4.steps)
    shipped = OrtGenAIRuntime(root / "exp", m.variant.deploy)
    assert shipped.kernels == measured.kernels
    assert torch.equal(shipped.logits(PROBE), measured.logits(PROBE))


def test_a_changed_onnx_data_file_fails_the_weights_check(ort_export, tmp_path, monkeypatch):
    root, _ = ort_export
    copy = tmp_path / "exp"
    shutil.copytree(root / "exp", copy)
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    monkeypatch.setattr(greenopt.ship.gate, "assess", lambda *a, **k: pytest.fail("must not measure"))
    r = verify(_estimate(copy))
    assert not r.passed and r.reason.startswith("weights changed since export: ")
    assert "model.onnx.data" in r.reason and "\n" not in r.reason


def test_verify_of_an_ort_export_measures_the_artifact_against_transformers(ort_export, monkeypatch):
    root, m = ort_export
    spec = _spec_of_verify(root / "exp", monkeypatch)
    assert spec.artifact == str(root / "exp") and spec.model == m.base_model and spec.baseline is None
    assert spec.variant == Variant(deploy=ORT_INT4.deploy)
    monkeypatch.undo()
    loaded = []
    real = greenopt.assess.load_artifact

    def counting(folder, deploy, device="cpu"):
        loaded.append(str(folder))
        return real(folder, deploy, device)

    monkeypatch.setattr(greenopt.assess, "load_artifact", counting)
    r = verify(_estimate(root / "exp"))
    assert r.card is not None, r.reason
    assert loaded == [str(root / "exp")] * 3  # the measured one, then reloaded for each fresh comparison
    rt = r.card.runtime
    assert rt.deployed.name == ORT and "MatMulNBits int4" in rt.deployed.kernels[0]
    assert rt.baseline.name == "transformers" and rt.baseline.dtype == "float32"
    assert r.card.variant == m.variant_info and r.passed, r.reason


def test_a_full_disk_leaves_no_ort_export(ort_export, tmp_path, monkeypatch):
    root, _ = ort_export
    model, tok = _measured(root, ORT_INT4)
    runtime = realise(model, tok, ORT_INT4.deploy, steps=ORT_INT4.steps)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(greenopt.ship.exporter, "write_readme", full)
    with pytest.raises(WriteError, match="no space left on device"):
        export(model, tok, ORT_INT4, None, tmp_path / "out", runtime=runtime)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_runtime_of_another_deploy(ort_export, tmp_path):
    root, _ = ort_export
    runtime = realise(*_measured(root, ORT_INT4), ORT_INT4.deploy, steps=ORT_INT4.steps)
    with pytest.raises(ConfigError, match="deployed on transformers"):
        export(tiny_llama(), tiny_tokenizer(), Variant(), None, tmp_path / "out", runtime=runtime)
