"""The real default model through the GO-1 protocol and lm-eval, via the CLI (slow, marked)."""

import json

import pytest

from greenopt.cli import main

pytestmark = pytest.mark.integration


def test_measure_default_model_card(tmp_path, capsys):
    rc = main(["measure", "--model", "default", "--protocol", "quick", "--tasks", "arc_easy", "--limit", "20",
               "--meter", "estimate", "--threads", "2", "--out", str(tmp_path), "--json"])
    assert rc == 0
    card = json.loads(capsys.readouterr().out)["card"]
    assert card["model_id"] == "SmolLM2-135M-Instruct"
    assert card["protocol_id"] == "GO-1/b1/p32-n16"
    assert card["tier"] == "E1" and card["relative"]["display"].startswith("~")
    # The model against itself: EEI near 100 (same run, A B A B).
    assert 60 < card["relative"]["value"] < 160
    # Reported from 3 fresh comparisons, and the card says so.
    assert "over 3 comparisons" in card["interval_note"] and len(card["eei_runs"]) == 3
    assert card["candidate"]["tokens_per_s"] > 1
    assert card["accuracy"][0]["n"] == 20


def test_depth_cut_costs_fewer_joules(tmp_path, capsys):
    variant = tmp_path / "depth.yaml"
    variant.write_text("steps:\n  - kind: depth\n    drop: 10\n")
    rc = main(["measure", "--model", "default", "--variant", str(variant), "--protocol", "quick", "--tasks",
               "--meter", "estimate", "--threads", "2", "--out", str(tmp_path / "card"), "--json"])
    assert rc == 0
    card = json.loads(capsys.readouterr().out)["card"]
    # 10 of 30 decoder layers dropped: the work per token really falls, so must the estimate.
    assert card["relative"]["value"] < 95
    assert card["variant"]["params_after"] < card["variant"]["params_before"]
