"""The noise floor: A/A comparisons, stored per machine/meter/protocol/threads, widening intervals."""

from __future__ import annotations

import json

import pytest
import torch

from greenopt.calibrate import (
    CalibrateSpec,
    _in_fresh_process,
    aa_comparison,
    calibrate,
    estimate_s,
    in_run_coverage,
)
from greenopt.cli import main
from greenopt.config import protocol_preset
from greenopt.measure import noise
from greenopt.measure.workload import compare_repeated
from greenopt.records import Comparison
from greenopt.testing import FakeMeter, tiny_llama, tiny_tokenizer


@pytest.fixture()
def floors(tmp_path, monkeypatch):
    d = tmp_path / "calibration"
    monkeypatch.setenv("GREENOPT_CALIBRATION", str(d))
    return d


def _spec(tiny_dir, **kw):
    return CalibrateSpec(model=str(tiny_dir), protocol="smoke", meter="estimate", threads=1, **kw)


def test_calibrate_stores_the_spread_of_k_aa_comparisons(tiny_dir, floors):
    seen = []
    floor = calibrate(_spec(tiny_dir), isolate=False, progress=lambda s, d, t: seen.append((d, t)))
    assert len(floor.eeis) == 5 and len(floor.in_run_intervals) == 5
    assert floor.log_sd > 0 and floor.tier == "E1" and floor.meter == "estimate" and floor.threads == 1
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    stored = noise.load_floor("estimate", protocol_preset("smoke").id, 1)
    assert stored == floor and (floors / f"{floor.key}.json").is_file()
    assert noise.load_floor("estimate", protocol_preset("smoke").id, 2) is None  # per thread count
    assert noise.load_floor("rapl", protocol_preset("smoke").id, 1) is None  # per meter
    assert 0.0 <= in_run_coverage(floor) <= 1.0


def test_fewer_than_five_comparisons_are_refused(tiny_dir):
    with pytest.raises(ValueError):
        _spec(tiny_dir, comparisons=4)
    assert estimate_s(_spec(tiny_dir)) > 0


def test_an_uncalibrated_estimate_carries_the_stated_default_and_a_counter_none(floors):
    e1 = noise.floor_for("estimate", "E1", "GO-1/b1", 1)
    assert e1.log_sd == noise.DEFAULT_E1_FLOOR_LOG_SD and "uncalibrated" in e1.source
    m1 = noise.floor_for("rapl", "M1", "GO-1/b1", 1)
    assert m1.log_sd == 0.0 and m1.source is None


def test_a_corrupt_floor_file_is_ignored(floors):
    key = noise.floor_key("estimate", "GO-1/b1", 1)
    floors.mkdir(parents=True)
    (floors / f"{key}.json").write_text("{not json")
    assert noise.load_floor("estimate", "GO-1/b1", 1) is None
    assert noise.floor_for("estimate", "E1", "GO-1/b1", 1).log_sd == noise.DEFAULT_E1_FLOOR_LOG_SD


def _one_comparison(meter, protocol):
    model, tok = tiny_llama(layers=2), tiny_tokenizer()
    return compare_repeated(lambda r: (model, model), tok, protocol, meter, 1)


def test_a_single_comparison_is_widened_by_the_stored_floor(tiny_dir, floors):
    protocol = protocol_preset("smoke")
    meter = FakeMeter(tier="M1")
    plain = _one_comparison(meter, protocol)
    assert plain.interval == "in-run" and plain.floor_log_sd == 0.0  # a counter, never calibrated
    floor = calibrate(_spec(tiny_dir), isolate=False)
    stored = floor.model_copy(update={"meter": "fake", "key": noise.floor_key("fake", protocol.id,
                                                                             torch.get_num_threads()),
                                      "log_sd": 0.05})
    noise.save_floor(stored)
    widened = _one_comparison(meter, protocol)
    assert widened.interval == "floored" and widened.floor_log_sd == 0.05
    assert "calibrated" in widened.floor_source and "widened" in widened.interval_note
    lo, hi = widened.eei_ci
    assert hi / lo > 1.15  # +-1.96 x 0.05 on the log scale at least


def test_an_uncalibrated_estimate_comparison_is_floored_by_the_default(floors):
    c = _one_comparison(FakeMeter(tier="E1"), protocol_preset("smoke"))
    assert c.interval == "floored" and c.floor_log_sd == noise.DEFAULT_E1_FLOOR_LOG_SD
    assert "uncalibrated default" in c.interval_note


def test_repeated_comparisons_never_read_narrower_than_the_floor():
    model, tok = tiny_llama(layers=2), tiny_tokenizer()
    protocol = protocol_preset("smoke")
    c = compare_repeated(lambda r: (model, model), tok, protocol, FakeMeter(), 3, floor_log_sd=0.1)
    lo, hi = c.eei_ci
    assert c.interval == "repeated" and hi / lo > 1.2 and len(c.runs) == 3


def test_one_comparison_runs_in_a_fresh_process(tiny_dir):
    c = Comparison.model_validate_json(_in_fresh_process(_spec(tiny_dir).model_dump_json()))
    assert c.candidate.tier == "E1" and c.eei > 0
    assert Comparison.model_validate_json(aa_comparison(_spec(tiny_dir).model_dump_json())).eei > 0


def test_cli_calibrate_show_and_refusals(tiny_dir, floors, capsys):
    assert main(["calibrate", "--show"]) == 0
    assert "no noise floor stored" in capsys.readouterr().out
    assert main(["calibrate", "--comparisons", "3"]) == 2
    assert "--comparisons" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tiny_dir), "--protocol", "nope", "--meter", "estimate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("greenopt: error:") and "nope" in err and "Traceback" not in err
    noise.save_floor(calibrate(_spec(tiny_dir), isolate=False))
    assert main(["calibrate", "--show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown) == 1 and shown[0]["meter"] == "estimate"


def test_measure_calibrates_on_first_use_only(tiny_dir, floors, tmp_path, monkeypatch, capsys):
    import greenopt.cli.measure as cli_measure

    monkeypatch.setenv("GREENOPT_AUTO_CALIBRATE", "1")
    real, calls = cli_measure.calibrate, []

    def in_process(spec, progress=None):
        calls.append(spec)
        return real(spec, progress=progress, isolate=False)  # fresh processes are tested above

    monkeypatch.setattr(cli_measure, "calibrate", in_process)
    argv = ["measure", "--model", str(tiny_dir), "--protocol", "smoke", "--meter", "estimate", "--cpu-watts", "10",
            "--threads", "1", "--tasks", "--comparisons", "1", "--out", str(tmp_path / "card")]
    assert main(argv) == 0
    assert len(calls) == 1 and calls[0].comparisons == 5 and calls[0].threads == 1
    shown = capsys.readouterr()
    assert "first use here: calibrating" in shown.out + shown.err
    card = json.loads((tmp_path / "card" / "label.json").read_text())
    assert "calibrat" in card["interval_note"] and "uncalibrated default" not in card["interval_note"]
    assert main(argv) == 0 and len(calls) == 1  # stored: not again
    monkeypatch.setenv("GREENOPT_CALIBRATION", str(tmp_path / "elsewhere"))
    assert main(argv + ["--no-calibrate"]) == 0 and len(calls) == 1
