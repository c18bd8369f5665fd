"""Export: every move kind reloads with the same logits; atomic writes; the card travels; runs."""

from __future__ import annotations

import pytest
import torch

from greenopt.config import (
    CalibSpec,
    DepthStep,
    ExpertPruneStep,
    MoefyStep,
    PruneStep,
    QuantizeStep,
    QuantOverride,
    Target,
    Variant,
    WidthStep,
)
from greenopt.errors import ConfigError
from greenopt.ship import ExportProvenance, export, load, load_manifest
from greenopt.ship.exporter import MANIFEST, files_sha256
from greenopt.testing import tiny_llama, tiny_mixtral, tiny_tokenizer

CALIB = CalibSpec(samples=4, seq_len=32)
PROBE = torch.arange(1, 20).unsqueeze(0)

CASES = {
    "depth": (Variant(steps=(DepthStep(drop=1),)), "transformers"),
    "width": (Variant(steps=(WidthStep(ffn_keep=0.5, heads_keep=0.5),)), "transformers"),
    "width-per-layer": (Variant(steps=(WidthStep(ffn_keep=0.5, layers="1-2"),)), "greenopt"),
    "prune-wanda": (Variant(steps=(PruneStep(sparsity=0.5),)), "transformers"),
    "prune-2:4": (Variant(steps=(PruneStep(method="magnitude", pattern="2:4"),)), "transformers"),
    "hqq4": (Variant(steps=(QuantizeStep(method="hqq", bits=4, group_size=32),)), "greenopt"),
    "rtn-with-embedding": (Variant(steps=(QuantizeStep(method="rtn", bits=8, group_size=32,
                                                       target=Target(include=("*",), exclude=())),)), "greenopt"),
    "gptq2-mixed": (Variant(steps=(QuantizeStep(method="gptq", bits=4, group_size=32, overrides=(
        QuantOverride(target=Target(include=("*mlp*",), layers="1-2"), bits=2, group_size=16),)),)), "greenopt"),
    "bnb-nf4": (Variant(steps=(QuantizeStep(method="bnb_nf4", bits=4, group_size=64),)), "transformers"),
    "bnb-int8": (Variant(steps=(QuantizeStep(method="bnb_int8", bits=8, threshold=0.0),)), "transformers"),
    "bnb-mixed": (Variant(steps=(QuantizeStep(method="bnb_nf4", bits=4, group_size=64, overrides=(
        QuantOverride(target=Target(layers="0"), method="bnb_int8", bits=8),)),)), "greenopt"),
    "torchao-int8": (Variant(steps=(QuantizeStep(method="torchao_int8", bits=8, group_size=32),)), "greenopt"),
    "moefy": (Variant(steps=(MoefyStep(experts=4, top_k=2),)), "greenopt"),
    "moefy+hqq-attn": (Variant(steps=(MoefyStep(experts=4, top_k=1),
                                      QuantizeStep(method="hqq", bits=8, group_size=32))), "greenopt"),
    "expert-prune": (Variant(steps=(ExpertPruneStep(keep=0.5, top_k=1),)), "transformers"),
}


def _applied(name: str):
    from greenopt.compress import apply

    variant, _ = CASES[name]
    model = tiny_mixtral() if name == "expert-prune" else tiny_llama()
    report = apply(model, variant, tokenizer=tiny_tokenizer(), calib=CALIB)
    return model.eval(), variant, report


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROBE).logits


@pytest.mark.parametrize("name", list(CASES))
def test_every_move_kind_reloads_with_the_same_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model, variant, report = _applied(name)
    want = _logits(model)
    m = export(model, tiny_tokenizer(), variant, None, tmp_path / "out",
               provenance=ExportProvenance(base_model="tiny", apply_report=report))
    assert m.loader == CASES[name][1], m.loader_reason
    assert torch.equal(_logits(load(tmp_path / "out")), want)
    if m.loader == "transformers":
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()), want)
    else:  # never a silent wrong model: transformers finds no weights it knows
        with pytest.raises(OSError):
            AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert "transformers cannot load it" in (tmp_path / "out" / "README.md").read_text()
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "tokenizer.json", MANIFEST, "README.md"} <= files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pth"))}


def test_manifest_records_what_reproduces_the_export(tmp_path):
    model, variant, report = _applied("hqq4")
    m = export(model, tiny_tokenizer(), variant, None, tmp_path / "out",
               provenance=ExportProvenance(base_model="tiny", apply_report=report, calib=CALIB,
                                           seeds={"torch": 7}))
    assert load_manifest(tmp_path / "out") == m
    assert m.variant == variant and m.variant_info.hash == variant.hash
    assert m.weights_sha256 == files_sha256(tmp_path / "out")
    assert m.seeds == {"calibration": 0, "torch": 7}
    assert {"torch", "transformers", "hqq", "python", "greenopt"} <= set(m.libraries)
    assert m.variant_info.weight_bytes_after == report.weight_bytes_after


def test_reapplying_a_calibrated_variant_gives_identical_weights(tmp_path):
    from greenopt.compress import apply

    variant = Variant(steps=(PruneStep(method="wanda", sparsity=0.3),
                             QuantizeStep(method="gptq", bits=4, group_size=32)))
    shas = []
    for i in range(2):
        model = tiny_llama()
        apply(model, variant, tokenizer=tiny_tokenizer(), calib=CALIB)
        shas.append(export(model, tiny_tokenizer(), variant, None, tmp_path / f"run{i}").weights_sha256)
    assert shas[0] == shas[1]
    a, b = load(tmp_path / "run0").state_dict(), load(tmp_path / "run1").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_needs_force_and_only_replaces_exports(tmp_path):
    model, variant, _ = _applied("depth")
    tok = tiny_tokenizer()
    export(model, tok, variant, None, tmp_path / "out")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        export(model, tok, variant, None, tmp_path / "out")
    export(model, tok, variant.model_copy(update={"name": "again"}), None, tmp_path / "out", force=True)
    assert load_manifest(tmp_path / "out").variant_name == "again"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a greenopt export"):
        export(model, tok, variant, None, tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_crash_mid_export_leaves_no_partial_folder(tmp_path, monkeypatch):
    import greenopt.ship.exporter as ex

    model, variant, _ = _applied("hqq4")
    tok = tiny_tokenizer()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "write_readme", boom)  # after the weights, before the rename
    with pytest.raises(RuntimeError, match="disk full"):
        export(model, tok, variant, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    first = export(model, tok, variant, None, tmp_path / "out")
    monkeypatch.setattr(ex, "write_readme", boom)
    with pytest.raises(RuntimeError):
        export(model, tok, variant.model_copy(update={"name": "new"}), None, tmp_path / "out", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert load_manifest(tmp_path / "out") == first  # the old export is intact


def test_unknown_greenopt_module_is_refused_before_writing(tmp_path):
    class Mystery(torch.nn.Module):
        pass

    Mystery.__module__ = "greenopt.compress.mystery"
    model = tiny_llama()
    model.model.layers[0].mlp.extra = Mystery()
    with pytest.raises(ConfigError, match="does not know how to save"):
        export(model, tiny_tokenizer(), Variant(), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_check_reload_and_lazy_package_loader(tmp_path):
    import greenopt

    model, variant, _ = _applied("moefy")
    export(model, tiny_tokenizer(), variant, None, tmp_path / "out", check_reload=True)
    assert greenopt.load is load
    assert torch.equal(_logits(greenopt.load(tmp_path / "out")), _logits(model))


# ---------------------------------------------------------------------------- the card travels


def _card(model_id: str = "tiny"):
    from test_verify import make_card

    return make_card().model_copy(update={"model_id": model_id})


def test_card_files_and_readme_travel_and_label_rerenders(tmp_path):
    from greenopt.cli.ship import cmd_label

    model, variant, _ = _applied("depth")
    card = _card()
    export(model, tiny_tokenizer(), variant, card, tmp_path / "out")
    out = tmp_path / "out"
    for f in ("label.json", "LABEL.md", "label.svg", "scheme-relative.yaml"):
        assert (out / f).is_file(), f
    readme = (out / "README.md").read_text()
    for text in ("Relative class: B", "tier M1", "arc_easy", "gCO2e per 1000 tokens at 475 g/kWh",
                 "Protocol GO-1/b1", "relative-eu v1", "from_pretrained(DIR)", card.greenopt_version):
        assert text in readme, text
    (out / "LABEL.md").unlink()
    (out / "README.md").write_text(readme.replace("## Energy label (greenopt)", "## stale") + "\nMy notes.\n")
    assert cmd_label(type("A", (), {"folder": str(out), "json": True})()) == 0
    assert (out / "LABEL.md").is_file()
    readme = (out / "README.md").read_text()
    assert "## Energy label (greenopt)" in readme and "## stale" not in readme and "My notes." in readme
    m = load_manifest(out)
    assert m.card_protocol_id == "GO-1/b1" and m.relative_scheme == "scheme-relative.yaml"


# ---------------------------------------------------------------------------- from a search run


def card_comparison():
    from test_verify import _measurement

    from greenopt.records import Comparison

    return Comparison(eei=45.0, eei_ci=(43.0, 47.0), baseline=_measurement(1.0, (0.98, 1.02), "M1", "GO-1/b1"),
                      candidate=_measurement(0.45, (0.43, 0.47), "M1", "GO-1/b1"))


def card_evals():
    from greenopt.records import EvalResult, TaskScore

    def ev(a, p):
        return EvalResult(scores=(TaskScore(task="arc_easy", metric="acc_norm", value=a, n=100),
                                  TaskScore(task="piqa", metric="acc_norm", value=p, n=100)), limit=100, seed=1)

    return ev(0.60, 0.64), ev(0.605, 0.645)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_int8"])
def test_bitsandbytes_export_reloads_on_cuda(method, tmp_path):
    from greenopt.compress import apply

    model = tiny_llama().to("cuda", torch.float16)
    step = QuantizeStep(method=method, bits=4 if method == "bnb_nf4" else 8, group_size=64, threshold=0.0)
    apply(model, Variant(steps=(step,)), tokenizer=tiny_tokenizer(), calib=CALIB)
    model.eval()
    with torch.inference_mode():
        want = model(PROBE.cuda()).logits
    assert export(model, tiny_tokenizer(), Variant(steps=(step,)), None, tmp_path / "out").loader == "transformers"
    with torch.inference_mode():
        got = load(tmp_path / "out", device="cuda")(PROBE.cuda()).logits
    assert torch.allclose(want.float(), got.float(), atol=1e-3, rtol=1e-3)
