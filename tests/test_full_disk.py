"""A real full disk (a tiny tmpfs) and Ctrl-C on a worker: one line, a non-zero exit, nothing half-written.

tests/test_bad_input.py simulates ENOSPC everywhere; here the kernel says it. The tmpfs needs
``mount`` (root in CI containers); where it cannot be mounted the cases skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from greenopt.cli import main
from greenopt.cli import search as cli_search
from greenopt.config import SearchSpec, SpaceSpec
from greenopt.search import prepare_study
from greenopt.testing.search import FakeRunner

PAGE = 4096


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs; ``fill(free_bytes)`` leaves about that much room on it."""
    mnt = tmp_path / "disk with space"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "test_bad_input.py's simulated ENOSPC cases still run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, free_bytes: int) -> None:
    """Fills ``disk`` with one file until about ``free_bytes`` (rounded to pages) stay free."""
    st = os.statvfs(disk)
    room = st.f_bavail * st.f_frsize - free_bytes
    if room > 0:
        with open(disk / ".filler", "wb") as f:
            f.write(b"\0" * room)


def one_line(capsys, rc, *needles: str) -> str:
    cap = capsys.readouterr()
    progress = re.compile(r".*: \d+/\d+")  # the plain progress lines of a non-terminal stderr
    lines = [ln for ln in cap.err.splitlines() if ln.strip() and not progress.fullmatch(ln)]
    assert rc not in (0, None), (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("greenopt: "), lines
    assert "Traceback" not in cap.out + cap.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(".tmp") or "greenopt-staging" in p.name)


def test_apply_onto_a_full_disk_leaves_no_export_and_no_staging(tiny_dir, tiny_disk, tmp_path, capsys):
    variant = tmp_path / "v.yaml"
    variant.write_text(yaml.safe_dump({"steps": [{"kind": "depth", "layers": "1"}]}))
    fill(tiny_disk, 8 * PAGE)  # room for the small files, not for the weights
    out = tiny_disk / "export"
    rc = main(["apply", "--model", str(tiny_dir), "--variant", str(variant), "--out", str(out)])
    one_line(capsys, rc, "no space left on device", str(out))
    assert not out.exists() and _leftovers(tiny_disk) == []


def test_measure_card_onto_a_full_disk_writes_no_card(tiny_dir, tiny_disk, capsys):
    fill(tiny_disk, PAGE)
    out = tiny_disk / "card"
    rc = main(["measure", "--model", str(tiny_dir), "--protocol", "smoke", "--tasks", "--meter", "estimate",
               "--device", "cpu", "--comparisons", "1", "--out", str(out)])
    one_line(capsys, rc, "no space left on device")
    assert not any(out.glob("*")) and _leftovers(tiny_disk) == []


def test_label_rerender_on_a_full_disk_keeps_the_old_set(tiny_dir, tiny_disk, tmp_path, capsys):
    card = tmp_path / "card"
    assert main(["measure", "--model", str(tiny_dir), "--protocol", "smoke", "--tasks", "--meter", "estimate",
                 "--device", "cpu", "--comparisons", "1", "--out", str(card)]) == 0
    capsys.readouterr()
    folder = tiny_disk / "card"
    shutil.copytree(card, folder)
    (folder / "LABEL.md").write_text("old markdown\n")  # the re-render would replace both
    (folder / "label.json").write_text(json.dumps(json.loads((folder / "label.json").read_text()), indent=4))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    json_pages = -(-len(before["label.json"]) // PAGE)
    fill(tiny_disk, json_pages * PAGE)  # the new label.json fits; LABEL.md and label.svg do not
    one_line(capsys, main(["label", str(folder)]), "no space left on device")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # not a mix of old and new
    assert _leftovers(tiny_disk) == []


def test_search_onto_a_full_disk_is_one_line(tiny_dir, tiny_disk, monkeypatch, capsys):
    real = cli_search.search
    monkeypatch.setattr(cli_search, "search", lambda spec, **kw: real(spec, runner=FakeRunner(num_layers=4), **kw))
    fill(tiny_disk, 2 * PAGE)
    rc = main(["search", "--model", str(tiny_dir), "--runs-dir", str(tiny_disk / "runs"), "--name", "full",
               "--target", "G", "--budget", "3"])
    one_line(capsys, rc, "full")


def test_ctrl_c_in_a_worker_exits_130_and_records_the_trial(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setattr("greenopt.report.plot.write_plots", lambda *a, **k: {})
    spec = SearchSpec(target="C", n_trials=4, runs_dir=str(tmp_path), seed=1, warm_start=False, storage=url,
                      study_name="shared", space=SpaceSpec(bits=(8, 4), layer_groups=2, prune=()))
    prepare_study(spec, num_layers=12)
    calls = {"n": 0}

    def interrupt(variant):
        calls["n"] += 1
        return KeyboardInterrupt() if calls["n"] == 2 else None

    real = cli_search.worker
    monkeypatch.setattr(cli_search, "worker", lambda *a, **kw: real(*a, **{**kw, "runner": FakeRunner(fail=interrupt)}))
    rc = main(["worker", "--storage", url, "--study", "shared"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "start the worker again" in err and "Traceback" not in err
    import optuna

    states = [t.state.name for t in optuna.load_study(study_name="shared", storage=url).trials]
    assert states[:2] == ["COMPLETE", "FAIL"]
    assert main(["worker", "--storage", url, "--study", "shared"]) == 0  # a new worker continues the study
