"""CLI of apply/export/verify/label/recipe: malformed recipes rejected with their field path and
exit 1; apply writes a reloadable export; verify prints one line and fails non-zero."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml

from greenopt.cli import ship as cli_ship


def run(argv: list[str]) -> int:
    """The real entry point: parse, call the handler, one-line error and exit 1 on bad input."""
    from greenopt.cli import main

    return main(argv)


# ---------------------------------------------------------------------------- malformed recipes

Q4 = {"kind": "quantize", "method": "rtn", "bits": 4, "group_size": 32}
SEARCH = {"target": "B"}


def _case(**kw):
    return {"variant": {"steps": [Q4]}, **kw}


MALFORMED = [
    # (id, recipe data (model is the tiny folder unless given), expected field path)
    ("unknown top-level key", _case(modle="x"), "modle"),
    ("unknown space key", {"search": {"space": {"bitz": [4]}}}, "search.space.bitz"),
    ("lowercase target", {"search": {"target": "b"}}, "search.target"),
    ("search and variant", {"search": SEARCH, "variant": {"steps": [Q4]}}, "search"),
    ("neither search nor variant", {}, "<root>"),
    ("bits not a width", {"variant": {"steps": [{**Q4, "bits": 5}]}}, "variant.steps.0.quantize.bits"),
    ("unknown step kind", {"variant": {"steps": [{"kind": "distill"}]}}, "variant.steps.0"),
    ("unknown step field", {"variant": {"steps": [{**Q4, "bitz": 4}]}}, "variant.steps.0.quantize.bitz"),
    ("unknown protocol preset", _case(protocol="turbo"), "protocol"),
    ("protocol typo", _case(protocol={"trialz": 3}), "protocol.trialz"),
    ("recipe version 2", _case(version=2), "version"),
    ("zero items per task", _case(evaluation={"limit": 0}), "evaluation.limit"),
    ("unknown quick protocol", {"search": SEARCH, "evaluation": {"fidelity": {"quick_protocol": "x"}}},
     "evaluation.fidelity.quick_protocol"),
    ("unknown meter", _case(measurement={"meter": "wattmeter"}), "measurement.meter"),
    ("negative intensity", _case(carbon={"intensity_g_per_kwh": -1}), "carbon.intensity_g_per_kwh"),
    ("unknown tier", _case(gate={"require_tier": "M3"}), "gate.require_tier"),
    ("pickle export", _case(export={"format": "pt"}), "export.format"),
    ("budget above 1", {"search": {"max_drop": 2}}, "search.max_drop"),
    ("sparsity range backwards", {"search": {"space": {"sparsity": [0.5, 0.2]}}}, "search.space.sparsity"),
    ("top_k above experts", {"variant": {"steps": [{"kind": "moefy", "experts": 2, "top_k": 4}]}},
     "variant.steps.0.moefy"),
    ("not a mapping", ["a", "list"], "<root>"),
    # cross-field rules
    ("search target not in scheme", {"search": {"target": "Z"}}, "search.target"),
    ("gate target not in scheme", _case(gate={"target": "H"}), "gate.target"),
    ("unknown scheme", _case(labels={"relative": "no-such-scheme"}), "labels.relative"),
    ("absolute scheme as relative", _case(labels={"relative": "absolute-go1"}), "labels.relative"),
    ("unordered class bounds", _case(labels={"relative": "SCHEME"}), "labels.relative"),
    ("absolute target without scheme", {"search": {"target_scheme": "absolute"}, "labels": {"absolute": None}},
     "search.target_scheme"),
    ("int8 method at 4 bits", {"variant": {"steps": [{**Q4, "method": "bnb_int8"}]}}, "variant.steps.0.bits"),
    ("override bits the method lacks", {"variant": {"steps": [{**Q4, "method": "bnb_nf4", "group_size": 64,
                                                               "overrides": [{"target": {"layers": "0"}, "bits": 3}]}]}},
     "variant.steps.0.overrides.0"),
    ("bnb block size", {"variant": {"steps": [{**Q4, "method": "bnb_nf4", "group_size": 48}]}},
     "variant.steps.0.group_size"),
    ("space method lacks a bit width", {"search": {"space": {"methods": ["bnb_nf4"], "bits": [16, 8]}}},
     "search.space.bits"),
    ("space bnb block size", {"search": {"space": {"methods": ["bnb_nf4"], "bits": [16, 4], "group_size": 48}}},
     "search.space.group_size"),
    ("estimate meter but M1 required", _case(measurement={"meter": "estimate"}, gate={"require_tier": "M1"}),
     "gate.require_tier"),
    ("search with a custom protocol", {"search": SEARCH, "protocol": {"new_tokens": 8}}, "protocol"),
    ("search without tasks", {"search": SEARCH, "evaluation": {"tasks": []}}, "evaluation.tasks"),
    ("budget without tasks", _case(evaluation={"tasks": []}, gate={"max_drop": 0.01}), "gate.max_drop"),
    ("missing model folder", _case(model="./no/such/model"), "model.id"),
    ("layer out of range", {"variant": {"steps": [{"kind": "depth", "layers": "7"}]}}, "variant.steps.0"),
    ("group size does not divide", {"variant": {"steps": [{**Q4, "group_size": 48}]}}, "variant.steps.0"),
    ("heads cut breaks GQA", {"variant": {"steps": [{"kind": "width", "heads_keep": 0.75}]}}, "variant.steps.0"),
    ("space heads cut breaks GQA", {"search": {"space": {"heads_keep": [0.75]}}}, "search.space.heads_keep"),
    ("space group size does not divide", {"search": {"space": {"group_size": 48}}}, "search.space.group_size"),
    ("missing variant file", {"variant": "nope.yaml"}, "<file>"),
]


@pytest.mark.parametrize("name,data,path", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_recipe_is_rejected_with_its_field_path(name, data, path, tiny_dir, tmp_path, capsys):
    if isinstance(data, dict):
        data = {"model": str(tiny_dir), **data}
        if data.get("labels", {}).get("relative") == "SCHEME":
            bad = {"name": "bad", "version": 1, "metric": "eei", "protocol": "GO-1",
                   "classes": [{"letter": "A", "max": 50}, {"letter": "B", "max": 40}, {"letter": "C", "max": None}]}
            (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
            data["labels"] = {"relative": str(tmp_path / "bad.yaml")}
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run(["recipe", "validate", str(f), "--no-dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line printed"
    assert any(line.startswith(f"{f}: {path}: ") for line in err), err


def test_table_is_large_enough():
    assert len(MALFORMED) >= 20


def test_valid_recipes_print_ok_and_exit_0(tiny_dir, tmp_path, capsys):
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump({"model": str(tiny_dir), "variant": {"steps": [Q4]}}))
    assert run(["recipe", "validate", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"OK {f}" in out and "dry run: quantize" in out


def test_one_bad_file_among_good_ones_fails_the_run(tiny_dir, tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({"model": str(tiny_dir), "variant": {"steps": [Q4]}}))
    bad.write_text(yaml.safe_dump({"model": str(tiny_dir), "variant": {"steps": [Q4]}, "x": 1}))
    assert run(["recipe", "validate", str(good), str(bad), "--no-dry-run"]) == 1
    captured = capsys.readouterr()
    assert f"OK {good}" in captured.out and f"{bad}: x: Extra inputs are not permitted" in captured.err


# ---------------------------------------------------------------------------- apply, label, verify


def test_apply_writes_a_reloadable_export_and_refuses_to_overwrite(tiny_dir, tmp_path, capsys):
    from greenopt.config import QuantizeStep, Variant, dump_yaml
    from greenopt.ship import load, load_manifest

    vfile = tmp_path / "v.yaml"
    vfile.write_text(dump_yaml(Variant(name="w", steps=(QuantizeStep(method="hqq", bits=4, group_size=32),))))
    out = tmp_path / "exp"
    assert run(["apply", "--model", str(tiny_dir), "--variant", str(vfile), "--out", str(out), "--check"]) == 0
    m = load_manifest(out)
    assert m.loader == "greenopt" and m.variant_name == "w" and m.base_model == str(tiny_dir)
    assert m.card_protocol_id is None and "Not measured" in (out / "README.md").read_text()
    with torch.inference_mode():
        assert torch.isfinite(load(out)(torch.arange(1, 9).unsqueeze(0)).logits).all()
    assert run(["apply", "--model", str(tiny_dir), "--variant", str(vfile), "--out", str(out)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err


def test_apply_refuses_a_search_recipe(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"search": {"target": "B"}}))
    assert run(["apply", str(f), "--out", str(tmp_path / "o")]) == 1
    assert "runs a search" in capsys.readouterr().err


def test_label_needs_a_card(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(["label", str(tmp_path / "empty")]) == 1
    assert "no label card there" in capsys.readouterr().err


def test_verify_fails_with_one_line_on_a_changed_protocol(tiny_dir, tmp_path, capsys):
    f = tmp_path / "pinned.yaml"
    f.write_text(yaml.safe_dump({"model": str(tiny_dir), "variant": {"steps": [{"kind": "depth", "layers": "1"}]},
                                 "protocol": "smoke", "evaluation": {"tasks": []}, "gate": {"target": "G"}}))
    assert run(["verify", str(f), "--protocol", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("greenopt: verify failed: protocol changed")


def test_verify_recipe_passes_and_fails_on_tier(tiny_dir, tmp_path, capsys):
    f = tmp_path / "pinned.yaml"
    f.write_text(yaml.safe_dump({"model": str(tiny_dir), "variant": {"steps": [{"kind": "depth", "layers": "1"}]},
                                 "protocol": "smoke", "evaluation": {"tasks": []}, "gate": {"target": "G"},
                                 "measurement": {"meter": "estimate"}}))
    card_dir = tmp_path / "card"
    assert run(["verify", str(f), "--meter", "estimate", "--device", "cpu"]) == 1
    assert "pass --allow-estimate to accept an estimate" in capsys.readouterr().err
    assert run(["verify", str(f), "--meter", "estimate", "--device", "cpu", "--allow-estimate",
                "--card-out", str(card_dir)]) == 0
    passed = capsys.readouterr().out
    assert "PASS" in passed and "accepted because of --allow-estimate" in passed and (card_dir / "label.json").is_file()
    assert run(["verify", str(f), "--meter", "estimate", "--device", "cpu", "--allow-estimate",
                "--require-tier", "M2"]) == 1
    verdicts = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("greenopt: ")]
    assert len(verdicts) == 1 and verdicts[0].startswith("greenopt: verify failed: tier E1 is an estimate")


def test_verify_without_target_is_an_input_error(tiny_dir, tmp_path, capsys):
    f = tmp_path / "pinned.yaml"
    f.write_text(yaml.safe_dump({"model": str(tiny_dir), "variant": {"steps": [Q4]}, "protocol": "smoke"}))
    assert run(["verify", str(f)]) == 1
    assert "no target class: pass --target" in capsys.readouterr().err


def test_every_subcommand_parses_to_a_handler():

    parser = argparse.ArgumentParser(prog="greenopt")
    sub = parser.add_subparsers(dest="command")
    cli_ship.add_parsers(sub)
    argvs = [["apply", "r.yaml"], ["export", "runs/x", "--out", "o"], ["verify", "e", "--target", "B"],
             ["label", "e"], ["recipe", "validate", "a.yaml", "b.yaml"]]
    assert {parser.parse_args(a).command for a in argvs} == set(cli_ship.HANDLERS)
    assert parser.parse_args(argvs[2]).max_drop is None  # no budget unless asked: verify never invents one


def test_apply_recipe_then_verify_the_export_uses_the_recorded_gate(tiny_dir, tmp_path, capsys):
    from greenopt.ship import load_manifest

    f = tmp_path / "pinned.yaml"
    f.write_text(yaml.safe_dump({"model": str(tiny_dir), "variant": {"steps": [{"kind": "depth", "layers": "2"}]},
                                 "protocol": "smoke", "evaluation": {"tasks": []},
                                 "gate": {"target": "G", "require_tier": "E1", "allow_estimate": True},
                                 "calibration": {"seed": 5},
                                 "export": {"out": str(tmp_path / "exp")}}))
    assert run(["apply", str(f)]) == 0
    m = load_manifest(tmp_path / "exp")
    assert m.protocol.preset == "smoke" and m.gate.target == "G" and m.seeds["calibration"] == 5
    assert m.loader == "transformers" and m.source == str(f)
    assert run(["verify", str(tmp_path / "exp"), "--meter", "estimate", "--device", "cpu"]) == 0
    assert "PASS class" in capsys.readouterr().out
