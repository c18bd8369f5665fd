"""CLI: measure end to end on a tiny saved model, and one-line errors for bad input."""

import json

from greenopt.cli import main


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("greenopt: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_measure_writes_card_and_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "card"
    rc = main(["measure", "--model", str(tiny_dir), "--protocol", "smoke", "--tasks", "arc_easy",
               "--limit", "3", "--meter", "estimate", "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    card = doc["card"]
    assert card["tier"] == "E1"
    assert card["relative"]["display"].startswith("~")  # an estimate never carries a plain letter
    assert card["protocol_id"] == "GO-1/b1/p8-n4"
    assert [t["task"] for t in card["accuracy"]] == ["arc_easy"]
    assert {p.name for p in out.iterdir()} == {"label.json", "LABEL.md", "label.svg"}


def test_unknown_model_path(capsys):
    msg = _one_line_error(capsys, main(["measure", "--model", "./no/such/model", "--protocol", "smoke"]))
    assert "no such model folder" in msg


def test_unknown_task(tiny_dir, capsys):
    msg = _one_line_error(capsys, main(["measure", "--model", str(tiny_dir), "--tasks", "no_such_task_xyz"]))
    assert "unknown task 'no_such_task_xyz'" in msg


def test_zero_new_tokens(tiny_dir, capsys):
    msg = _one_line_error(capsys, main(["measure", "--model", str(tiny_dir), "--new-tokens", "0"]))
    assert "new_tokens" in msg


def test_malformed_scheme_file(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\nmetric: eei\nclasses: [{letter: A, max: 50}, {letter: B, max: 40}, "
                   "{letter: C, max: null}]\nprotocol: GO-1\n")
    msg = _one_line_error(capsys, main(["measure", "--model", str(tiny_dir), "--scheme", str(bad)]))
    assert str(bad) in msg


def test_unreadable_rapl(tiny_dir, tmp_path, capsys, monkeypatch):
    import builtins
    import functools

    from greenopt.measure import rapl, select

    zone = tmp_path / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("123\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    real_open = builtins.open

    def root_only(path, *a, **k):  # tests run as root, so simulate the PLATYPUS permission fix
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(rapl, "open", root_only, raising=False)
    monkeypatch.setattr(select, "RaplMeter", functools.partial(rapl.RaplMeter, root=tmp_path / "powercap"))
    rc = main(["measure", "--model", str(tiny_dir), "--meter", "rapl", "--protocol", "smoke"])
    msg = _one_line_error(capsys, rc)
    assert "energy_uj" in msg and "chmod" in msg


def test_unknown_protocol_preset(tiny_dir, capsys):
    msg = _one_line_error(capsys, main(["measure", "--model", str(tiny_dir), "--protocol", "fast"]))
    assert "unknown protocol preset 'fast'" in msg


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out
