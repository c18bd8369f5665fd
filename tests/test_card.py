"""The label card: building, JSON round trip, Markdown fields, SVG well-formedness, atomic writes."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import pytest

import greenopt
from greenopt.config import protocol_preset
from greenopt.errors import ConfigError
from greenopt.label import load_scheme
from greenopt.label.card import (
    CARD_FILES,
    build_card,
    load_card,
    render_json,
    render_markdown,
    render_svg,
    write_card,
)
from greenopt.records import (
    ApplyReport,
    Comparison,
    DeviceInfo,
    EnergyMeasurement,
    EvalResult,
    LabelCard,
    RuntimeInfo,
    StepReport,
    TaskScore,
    TrialFigures,
)

RUNTIME = dict(torch="2.13.0", transformers="5.23.0", attention="sdpa", dtype="bfloat16",
               batch_size=1, prompt_tokens=256, new_tokens=256, libraries={"hqq": "0.2.8.post1"})
DEVICE = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", meter="nvml", boundary="GPU board (NVML)",
                    driver="570.124.06", power_limit_w=700.0)


def _meas(jpt, tier="M1", tps=60.0, flags=(), protocol_id="GO-1/b1", device=DEVICE):
    trial = TrialFigures(energy_j=jpt * 512, duration_s=512 / tps, generated_tokens=512, prompt_tokens=1024)
    return EnergyMeasurement(
        joules_per_token=jpt, joules_per_token_ci=(jpt * 0.98, jpt * 1.02), trials=(trial,) * 6,
        decode_joules_per_token=jpt * 0.9, prefill_joules_per_prompt_token=jpt * 0.05, tokens_per_s=tps,
        mean_power_w=jpt * tps, idle_power_w=61.5, cv=0.0123, tier=tier, source_tier=tier,
        device=device, protocol_id=protocol_id, flags=flags)


def _eval(arc, piqa, ppl):
    return EvalResult(scores=(TaskScore(task="arc_easy", metric="acc", value=arc, n=200),
                              TaskScore(task="piqa", metric="acc", value=piqa, n=200),
                              TaskScore(task="wikitext", metric="word_perplexity", value=ppl, n=50,
                                        higher_is_better=False)), limit=200, seed=1234)


def _card(tier="M1", model_id="HuggingFaceTB/SmolLM2-135M-Instruct", eei_ci=(60.0, 66.0), **kw):
    base, cand = _meas(2.0, tier), _meas(1.24, tier, tps=95.0)
    comp = Comparison(eei=62.0, eei_ci=eei_ci, baseline=base, candidate=cand)
    args = dict(model_id=model_id, variant_name="hqq4-mlp", variant_hash="a1b2c3d4e5f6", comparison=comp,
                candidate_eval=_eval(0.55, 0.66, 12.5), baseline_eval=_eval(0.58, 0.67, 11.0),
                runtime=RUNTIME, absolute_scheme="absolute-go1", intensity_g_per_kwh=300.0,
                date="2026-03-02T10:15:00+00:00")
    return build_card(**{**args, **kw})


def test_build_m1_card():
    card = _card()
    assert card.relative.display == "C (C-D)" and card.relative.worst_letter == "D"
    assert card.absolute is not None and card.absolute.display == "E" and card.absolute_note is None
    assert card.tier == "M1" and not card.estimated and card.flags == ()
    assert card.carbon.g_per_1k_tokens == pytest.approx(1.24 * 1000 / 3.6e6 * 300.0)
    assert card.carbon.intensity_g_per_kwh == 300.0 and not card.carbon.estimated
    assert card.candidate.trials == 6 and card.protocol_id == "GO-1/b1"
    assert card.greenopt_version == greenopt.__version__ and card.runtime.libraries == {"hqq": "0.2.8.post1"}
    arc, _, ppl = card.accuracy
    assert arc.baseline == 0.58 and arc.drop == pytest.approx(0.03)
    assert ppl.drop == pytest.approx(1.5)  # lower is better: a higher perplexity is a drop


def test_estimated_card_is_never_plain():
    card = _card(tier="E1")
    assert card.estimated and card.relative.display == "~C (C-D, estimated)"
    assert card.absolute is None and "no absolute class" in card.absolute_note and "M1/M2" in card.absolute_note
    assert "~E" not in render_markdown(card)  # no absolute letter at all from an estimate, not even marked
    assert card.carbon.estimated
    svg = render_svg(card)
    assert "ESTIMATE — not a measured label" in svg and ">~C<" in svg
    assert "ESTIMATE" in render_markdown(card)


def test_absolute_grade_is_opt_in_and_protocol_checked(tmp_path):
    card = _card(absolute_scheme=None)
    assert card.absolute is None and "opt-in" in card.absolute_note
    p = tmp_path / "abs.yaml"
    p.write_text("name: abs-b8\nversion: 2\nmetric: joules_per_token\nprotocol: GO-1/b8\n"
                 "classes: [{letter: A, max: 1}, {letter: B, max: null}]\n")
    card = _card(absolute_scheme=str(p))
    assert card.absolute is None and "GO-1/b8" in card.absolute_note and "GO-1/b1" in card.absolute_note


def test_absolute_scheme_accepts_only_its_anchored_workload():
    s = load_scheme("absolute-go1")
    assert s.accepts_protocol("GO-1/b1") and s.accepts_protocol("GO-1/b64")
    assert not s.accepts_protocol("GO-1/b1/p64-n32") and not s.accepts_protocol("GO-1/b10x")
    rel = load_scheme("relative-eu")
    assert rel.accepts_protocol("GO-1/b1/p64-n32")  # a ratio holds under any preset, both sides alike


def test_a_flagged_counter_reading_keeps_saying_it_is_a_counter_reading():
    card = _card()
    flagged = card.model_copy(update={"tier": "M2", "candidate": card.candidate.model_copy(
        update={"tier": "M2", "source_tier": "M1", "flags": ("high-cv",)})})
    md = render_markdown(flagged)
    assert "hardware energy counter, flagged (high-cv): counted one tier down as M2" in md
    assert "sampled power" not in md


def test_build_card_checks_inputs():
    with pytest.raises(ConfigError, match="grade_measurement"):
        _card(relative_scheme="absolute-go1")
    with pytest.raises(ConfigError, match="runtime: gpu"):
        _card(runtime={**RUNTIME, "gpu": "x"})
    with pytest.raises(ValueError, match="piqa"):
        _card(baseline_eval=EvalResult(scores=(TaskScore(task="arc_easy", metric="acc", value=0.5, n=1),
                                                TaskScore(task="wikitext", metric="word_perplexity",
                                                          value=1.0, n=1)), limit=1, seed=0))
    rep = ApplyReport(variant_hash="ffffffffffff", steps=(), params_before=1, params_after=1,
                      weight_bytes_before=1, weight_bytes_after=1, bits_per_layer={}, sparsity=0.0,
                      flops_per_token_before=1, flops_per_token_after=1, fast_kernel=None)
    with pytest.raises(ValueError, match="apply report"):
        _card(apply_report=rep)


def test_json_round_trip(tmp_path):
    step = StepReport(kind="quantize", summary="hqq 4-bit g64 on 90 mlp Linear", modules=90,
                      params_before=100, params_after=100, weight_bytes_before=200, weight_bytes_after=60)
    rep = ApplyReport(variant_hash="a1b2c3d4e5f6", steps=(step,), params_before=100, params_after=100,
                      weight_bytes_before=200, weight_bytes_after=60, bits_per_layer={"x": 4.0},
                      sparsity=0.0, flops_per_token_before=1, flops_per_token_after=1, fast_kernel=True)
    for card in (_card(apply_report=rep), _card(tier="E1", absolute_scheme=None)):
        assert LabelCard.model_validate_json(render_json(card)) == card
        paths = write_card(card, tmp_path / card.tier)
        assert load_card(paths["json"]) == card and load_card(tmp_path / card.tier) == card
        assert json.loads(paths["json"].read_text())["relative"]["display"] == card.relative.display


def test_load_card_errors(tmp_path):
    with pytest.raises(ConfigError, match="no label card"):
        load_card(tmp_path)
    (tmp_path / "label.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_card(tmp_path / "label.json")
    data = json.loads(render_json(_card()))
    data["tier"] = "M9"
    (tmp_path / "label.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="tier") as e:
        load_card(tmp_path)
    assert "\n" not in str(e.value)


def test_markdown_states_every_field():
    card = _card(model_id="org/model|pipe")
    md = render_markdown(card)
    must = [
        "org/model\\|pipe", "hqq4-mlp", "a1b2c3d4e5f6",                   # model and variant
        "C (C-D)", "EEI 62.0", "60.0–66.0",                              # relative class, EEI, interval
        "1.24 J/token", "1.22–1.26", "class E", "absolute-go1 v1",      # absolute
        "decode J/token", "1.12", "prefill J per prompt token", "0.062", "tokens/s", "95.0",
        "mean power W", "118", "idle power W", "61.5",
        "Tier: M1", "GPU board (NVML)", "NVIDIA H100 80GB HBM3", "570.124.06", "700 W",
        "torch 2.13.0", "transformers 5.23.0", "hqq 0.2.8.post1", "sdpa", "bfloat16",
        "Batch size: 1", "prompt tokens: 256", "new tokens: 256",
        "| trials | 6 | 6 |", "1.2%", "all checks passed",
        "| arc_easy | acc | 55.0% | 58.0% | 3.0 pt | 200 |", "| piqa | acc | 66.0% | 67.0% | 1.0 pt | 200 |",
        "| wikitext | word_perplexity | 12.5 | 11.0 | 1.5 | 50 |",
        "0.103 gCO2e per 1000 generated tokens", "300 g/kWh",
        "Protocol GO-1/b1", "relative-eu v1", "2026-03-02T10:15:00+00:00", f"greenopt {greenopt.__version__}",
    ]
    missing = [m for m in must if m not in md]
    assert not missing, missing


def test_markdown_reports_failed_checks():
    base, cand = _meas(2.0), _meas(1.24, flags=("cv-high",), tier="M2")
    comp = Comparison(eei=62.0, eei_ci=(60.0, 66.0), baseline=base, candidate=cand)
    card = _card(comparison=comp)
    assert card.flags == ("cv-high",) and card.relative.display == "C (C-D, M2)"
    assert "failed: cv-high" in render_markdown(card) and "failed: cv-high" in render_svg(card)


def test_svg_is_wellformed_and_escapes_text():
    nasty = "<script>alert(1)</script>&co\x01"
    svg = render_svg(_card(model_id=nasty))
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and root.attrib["viewBox"] == "0 0 300 550"
    texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "<script>" not in svg and any(t.startswith("<script>alert(1)</script>&co") for t in texts)
    assert "C" in texts and "C–D" in texts  # the marker letter and the interval's range
    assert sum(t in texts for t in "ABCDEFG") == 7 and "ESTIMATE" not in svg
    assert "href" not in svg and "url(" not in svg  # self-contained
    assert any(t.startswith("1.24 J/token") for t in texts)


def test_write_card_is_atomic(tmp_path, monkeypatch):
    card = _card()
    paths = write_card(card, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CARD_FILES.values())
    assert set(paths) == {"json", "markdown", "svg"} and all(p.stat().st_mode & 0o044 for p in paths.values())
    before = paths["json"].read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_card(_card(tier="E1"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CARD_FILES.values())
    assert paths["json"].read_text() == before


def test_current_runtime_reads_installed_versions():
    import torch

    from greenopt.label.card import current_runtime

    rt = current_runtime(protocol_preset("cpu"), "eager", "float32", libraries=("no-such-dist-xyz",))
    assert isinstance(rt, RuntimeInfo) and rt.torch.split("+")[0] == torch.__version__.split("+")[0]
    assert (rt.prompt_tokens, rt.new_tokens, rt.batch_size) == (64, 32, 1)
    assert rt.libraries == {"no-such-dist-xyz": "not installed"}
