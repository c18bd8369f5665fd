"""Faults leave a consistent run and one clear error: storage URLs, run folders, two processes
on one run, killed exports, weights changed after export."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import greenopt.ship.gate
from greenopt.cli import main
from greenopt.compress import apply
from greenopt.config import DepthStep, SearchSpec, SpaceSpec, Variant, protocol_preset
from greenopt.errors import ConfigError, GreenoptError
from greenopt.search import prepare_study, records, search, worker
from greenopt.search.rundir import RunDir, locked, run_dir
from greenopt.search.storage import storage_url
from greenopt.ship import ExportProvenance, export, load_manifest
from greenopt.ship.exporter import clean_stale
from greenopt.ship.gate import VerifySpec, verify
from greenopt.testing import tiny_llama, tiny_tokenizer
from greenopt.testing.search import FakeRunner

optuna.logging.set_verbosity(optuna.logging.WARNING)
SMALL = SpaceSpec(bits=(8, 4), layer_groups=2, prune=("2:4",), depth_drop_max=0.25, ffn_keep_min=0.75)
REFUSED = "postgresql+psycopg2://u:secret@127.0.0.1:1/db"  # nothing listens on port 1: refused at once


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("greenopt.report.plot.write_plots", lambda *a, **k: {})


def make_spec(tmp_path, **kw) -> SearchSpec:
    base = {"target": "C", "n_trials": 4, "runs_dir": str(tmp_path / "runs"), "space": SMALL, "seed": 1,
            "warm_start": False, "name": "run"}
    return SearchSpec(**{**base, **kw})


def load(spec: SearchSpec) -> optuna.Study:
    return optuna.load_study(study_name=spec.resolved_study_name, storage=run_dir(spec).sqlite_url)


def assert_files_agree_with_the_study(spec: SearchSpec) -> None:
    rd, study = run_dir(spec), load(spec)
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    for f in sorted(rd.trials.glob("*.json")):
        rec = json.loads(f.read_text())
        assert states[rec["number"]] == rec["state"], f"{f.name} says {rec['state']}, the study {states[rec['number']]}"


# ---------------------------------------------------------------------------- 1. storage URLs


def _bad_storages(tmp_path: Path) -> list[tuple[str, str]]:
    (tmp_path / "afile").write_text("not a folder")
    cases = [
        ("not a url", "is not a database URL"),
        ("nosuchdb://h/x", "unknown database kind 'nosuchdb'"),
        (REFUSED, r"postgresql\+psycopg2://\*\*\*@127.0.0.1:1/db: cannot connect .*Connection refused"),
        (f"sqlite:///{tmp_path}/a?b/study.db", "the sqlite path holds '\\?'"),
        (f"sqlite:///{tmp_path}/{{x}}/study.db", "read by Optuna as a template"),
        (f"sqlite:///{tmp_path}/missing/study.db", f"folder {re.escape(str(tmp_path))}/missing does not exist"),
        (f"sqlite:///{tmp_path}/afile/study.db", f"{re.escape(str(tmp_path))}/afile is a file, not a folder"),
    ]
    if importlib.util.find_spec("MySQLdb") is None:
        driver = (r"mysql://\*\*\*@db.example/x: its database driver is not installed "
                  r"\(No module named 'MySQLdb'\); pip install pymysql")
        cases.append(("mysql://u:secret@db.example/x", driver))
    return cases


def test_a_bad_storage_fails_in_one_line_before_the_model_loads(tmp_path):
    for url, match in _bad_storages(tmp_path):
        runner = FakeRunner()
        spec = make_spec(tmp_path, storage=url)
        with pytest.raises(ConfigError, match=match) as err:
            search(spec, runner=runner)
        assert not runner.prepared, url
        assert "secret" not in str(err.value) and "\n" not in str(err.value)
        assert not run_dir(spec).root.exists(), "a run that never started leaves no folder"
        with pytest.raises(ConfigError, match=match):
            worker(url, "run", runner=runner)
        assert not runner.prepared, url


def test_the_documented_postgresql_form_uses_the_installed_driver(tmp_path):
    if importlib.util.find_spec("psycopg") is not None or importlib.util.find_spec("psycopg2") is None:
        pytest.skip("needs psycopg2 without psycopg 3")
    assert storage_url("postgresql://u:p@host/db") == "postgresql+psycopg2://u:p@host/db"
    assert storage_url("postgresql+psycopg://u:p@host/db") == "postgresql+psycopg://u:p@host/db"
    runner = FakeRunner()
    with pytest.raises(ConfigError, match=r"postgresql://\*\*\*@127.0.0.1:1/db: cannot connect"):
        search(make_spec(tmp_path, storage="postgresql://u:secret@127.0.0.1:1/db"), runner=runner)
    assert not runner.prepared


def test_odd_characters_in_the_runs_dir_keep_the_study_in_the_run_folder(tmp_path):
    spec = make_spec(tmp_path, runs_dir=str(tmp_path / "r{1}?x#y%20 z"), n_trials=3)
    res = search(spec, runner=FakeRunner())
    rd = run_dir(spec)
    assert rd.study_db.is_file() and sorted(p.name for p in (tmp_path).iterdir()) == ["r{1}?x#y%20 z"]
    assert len(records(load(spec))) == 3 and res.storage == rd.sqlite_url
    assert search(spec.model_copy(update={"n_trials": 4}), runner=FakeRunner(), resume=True).counts["COMPLETE"] >= 1


def test_cli_prints_one_error_line_for_a_bad_storage(capsys):
    assert main(["worker", "--storage", REFUSED, "--study", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("greenopt: error: storage postgresql+psycopg2://***@127.0.0.1:1/db")


# ---------------------------------------------------------------------------- 2. the runs dir


def test_a_runs_dir_that_is_a_file_is_a_config_error(tmp_path):
    (tmp_path / "runs").write_text("oops")
    runner = FakeRunner()
    with pytest.raises(ConfigError, match=f"the runs dir {re.escape(str(tmp_path / 'runs'))} is a file"):
        search(make_spec(tmp_path), runner=runner)
    assert not runner.prepared
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    prepare_study(make_spec(tmp_path, storage=url, study_name="shared"), num_layers=12)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        worker(url, "shared", runner=runner, runs_dir=str(tmp_path / "runs"))
    assert not runner.prepared


# ---------------------------------------------------------------------------- 3. one process per run


_HOLD = """
import sys, time
from pathlib import Path
from greenopt.search.rundir import RunDir, locked
with locked(RunDir(Path(sys.argv[1]))):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_live_run_refuses_resume_and_force_and_a_dead_holder_is_taken_over(tmp_path):
    spec = make_spec(tmp_path, n_trials=3)
    search(spec, runner=FakeRunner())
    rd = run_dir(spec)
    before = sorted(p.name for p in rd.trials.iterdir())
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(rd.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = (rf"run {re.escape(str(rd.root))} is in use by pid {holder.pid} on {socket.gethostname()} since \S+; wait for it, "
               r"or add workers through shared storage \(greenopt worker\)")
        for kw in ({"resume": True}, {"force": True}, {"resume": True, "force": True}):
            runner = FakeRunner()
            with pytest.raises(ConfigError, match=msg):
                search(spec.model_copy(update={"n_trials": 5}), runner=runner, **kw)
            assert not runner.prepared
        assert sorted(p.name for p in rd.trials.iterdir()) == before and len(load(spec).trials) == 3
    finally:
        holder.kill()  # kill -9: the lock file stays behind, naming a dead pid
        holder.wait()
    assert json.loads(rd.lock.read_text())["pid"] == holder.pid
    res = search(spec.model_copy(update={"n_trials": 5}), runner=FakeRunner(), resume=True)
    assert sum(res.counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) == 5
    assert not rd.lock.exists()


class _Gated(FakeRunner):
    """Sets ``running`` inside its first trial after the baseline and waits there until ``go`` is set."""

    def __init__(self, running, go, **kw) -> None:
        super().__init__(**kw)
        self.running, self.go = running, go

    def run(self, variant, **kw):
        if not variant.is_baseline and not self.running.is_set():
            self.running.set()
            assert self.go.wait(30)
        return super().run(variant, **kw)


def test_a_second_search_on_a_running_run_is_refused_and_the_first_finishes(tmp_path):
    spec = make_spec(tmp_path, n_trials=4)
    running, go, out = threading.Event(), threading.Event(), {}

    def first():
        try:
            out["result"] = search(spec, runner=_Gated(running, go))
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=first)
    t.start()
    try:
        assert running.wait(30)
        for kw in ({"resume": True}, {"force": True}):
            with pytest.raises(ConfigError, match=f"is in use by pid {os.getpid()}"):
                search(spec, runner=FakeRunner(), **kw)
    finally:
        go.set()
        t.join(60)
    assert "error" not in out, out.get("error")
    assert sum(out["result"].counts[s] for s in ("COMPLETE", "PRUNED", "FAIL")) == 4
    assert_files_agree_with_the_study(spec)


class _Usurped(FakeRunner):
    """In its first trial after the baseline, another process (here: another storage handle)
    fails the running trial, as a second search's recovery did before runs were locked."""

    def __init__(self, url: str, name: str, **kw) -> None:
        super().__init__(**kw)
        self.url, self.name, self.usurped = url, name, None

    def run(self, variant, **kw):
        if not variant.is_baseline and self.usurped is None:
            study = optuna.load_study(study_name=self.name, storage=self.url)
            (t,) = study.get_trials(states=(TrialState.RUNNING,))
            study.tell(t.number, state=TrialState.FAIL)
            self.usurped = t.number
        return super().run(variant, **kw)


def test_a_trial_file_is_written_only_after_the_study_took_the_result(tmp_path):
    spec = make_spec(tmp_path, n_trials=4)
    runner = _Usurped(run_dir(spec).sqlite_url, spec.resolved_study_name)
    with pytest.raises(GreenoptError, match=r"trial \d+ was finished by another process.*greenopt worker"):
        search(spec, runner=runner)
    assert load(spec).trials[runner.usurped].state == TrialState.FAIL
    assert not run_dir(spec).trial_path(runner.usurped).exists()
    assert_files_agree_with_the_study(spec)


def test_resume_rewrites_the_file_of_a_trial_it_marks_lost(tmp_path):
    spec = make_spec(tmp_path, n_trials=3)
    search(spec, runner=FakeRunner())
    rd, study = run_dir(spec), load(spec)
    done = records(study)[1]
    for how in ("attr", "file"):  # died after setting the record attr / after an old greenopt wrote the file
        trial = study.ask()
        rec = done.model_copy(update={"number": trial.number})
        rd.trial_path(trial.number).write_text(rec.model_dump_json())
        if how == "attr":
            trial.set_user_attr("record", rec.model_dump(mode="json"))
    bare = study.ask()  # died before anything was recorded
    search(spec.model_copy(update={"n_trials": 5}), runner=FakeRunner(), resume=True)
    study = load(spec)
    for number in (3, 4):
        assert study.trials[number].state == TrialState.FAIL
        on_disk = json.loads(rd.trial_path(number).read_text())
        assert on_disk["state"] == "FAIL" and on_disk["lost"] and on_disk["reason"].startswith("lost:")
        assert study.trials[number].user_attrs["record"] == on_disk
    assert study.trials[bare.number].state == TrialState.FAIL and not rd.trial_path(bare.number).exists()
    assert_files_agree_with_the_study(spec)


def test_the_lock_is_released_on_errors_and_leaves_no_empty_run_folder(tmp_path):
    rd = RunDir(tmp_path / "runs" / "x")
    with pytest.raises(KeyboardInterrupt), locked(rd):
        assert rd.lock.is_file()
        raise KeyboardInterrupt
    assert not rd.root.exists()
    with locked(rd):
        with pytest.raises(ConfigError, match=f"run {re.escape(str(rd.root))} is in use by pid {os.getpid()}"), \
                locked(rd):
            pass
        (rd.root / "kept").write_text("x")
    assert not rd.lock.exists() and (rd.root / "kept").is_file()


# ---------------------------------------------------------------------------- 4. export staging


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tiny_export_args():
    model = tiny_llama()
    return model, tiny_tokenizer(), Variant(name="tiny")


def test_an_export_removes_the_staging_folders_killed_exports_left(tmp_path):
    dead = tmp_path / f".out.greenopt-staging-{_dead_pid()}-abc123"
    old = tmp_path / ".out.greenopt-staging-1-old999"  # pid 1 is alive, but the folder is two days old
    live = tmp_path / ".out.greenopt-staging-1-live42"
    other = tmp_path / f".other.greenopt-staging-{_dead_pid()}-zzz"  # another --out's: not ours to remove
    for d in (dead, old, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    export(*_tiny_export_args(), None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])


def test_an_export_killed_while_replacing_puts_the_old_one_back(tmp_path):
    model, tok, variant = _tiny_export_args()
    export(model, tok, variant, None, tmp_path / "out")
    aside = tmp_path / f".out.greenopt-old-{_dead_pid()}-k1ll3d"
    aside.mkdir()
    os.replace(tmp_path / "out", aside / "export")  # killed between moving the old export aside and the swap
    clean_stale(tmp_path / "out")
    assert load_manifest(tmp_path / "out").variant_name == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exports_have_ordinary_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        export(*_tiny_export_args(), None, tmp_path / "out")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in (out, *out.rglob("*"))}
    assert any(str(p).endswith(".safetensors") for p in modes)
    for p, mode in modes.items():
        want = (0o777 if (out / p).is_dir() else 0o666) & ~umask
        assert mode == want, f"{p}: {oct(mode)} != {oct(want)}"


# ---------------------------------------------------------------------------- 5. weights changed


def test_verify_fails_an_export_whose_weights_changed_without_measuring(tmp_path, monkeypatch, capsys):
    tok = tiny_tokenizer()
    tiny_llama().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = tiny_llama()
    variant = Variant(name="depth-1", steps=(DepthStep(drop=1),))
    report = apply(model, variant, tokenizer=tok)
    prov = ExportProvenance(base_model=str(tmp_path / "base"), protocol=protocol_preset("smoke"), apply_report=report)
    export(model, tok, variant, None, tmp_path / "export", provenance=prov)
    weights = next((tmp_path / "export").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(greenopt.ship.gate, "assess", lambda *a, **k: pytest.fail("must not measure"))
    r = verify(VerifySpec(source=str(tmp_path / "export"), target="G", tasks=(), device="cpu", meter="estimate"))
    recorded = load_manifest(tmp_path / "export").weights_sha256
    assert not r.passed and r.card is None and r.failures == (r.reason,)
    assert r.reason.startswith("weights changed since export: ") and f"!= recorded {recorded[:16]}" in r.reason
    assert "sha256" in r.reason
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "export"), "--target", "G", "--tasks"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("greenopt: verify failed: weights changed since export")
