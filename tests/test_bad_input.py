"""Bad input to every command: one line ``greenopt: error: ...`` on stderr naming what is wrong,
a non-zero exit, no traceback, nothing half-written, and (where it can) before any model loads.
Legal but unusual input (unicode and spaces in paths, a zero-carbon grid) works.

Commands are called in-process (``greenopt.cli.main``); models are the tiny saved llama of
``conftest.tiny_dir``, searches run on ``FakeRunner``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from greenopt import _io
from greenopt.cli import build_parser, main
from greenopt.cli import search as cli_search
from greenopt.config import (
    SearchSpec,
    SpaceSpec,
    Variant,
    dump_yaml,
    load_variant,
    load_yaml,
    validated,
)
from greenopt.config.recipe import load_recipe
from greenopt.errors import ConfigError, GreenoptError
from greenopt.search import search
from greenopt.search.rundir import run_dir
from greenopt.testing.search import FakeRunner

DEPTH1 = {"steps": [{"kind": "depth", "layers": "1"}]}
BACKWARDS_QUANT = {"steps": [{"kind": "quantize", "method": "rtn", "bits": 4, "group_size": 32,
                              "target": {"layers": "3-1"}}]}
BACKWARDS_DEPTH = {"steps": [{"kind": "depth", "layers": "3-1"}]}
NOT_UTF8 = b"name: caf\xe9\nsteps: []\n"  # Latin-1, as an old editor saves it


def one_line_error(capsys, rc, *needles: str) -> str:
    """Asserts the contract and returns the error line."""
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc not in (0, None), (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("greenopt: error: "), lines
    assert "Traceback" not in cap.out + cap.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _dump(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _spec(tiny, runs, **kw) -> SearchSpec:
    space = SpaceSpec(bits=(8, 4), layer_groups=2, prune=(), depth_drop_max=0.25, ffn_keep_min=1.0)
    base = {"model": str(tiny), "target": "G", "n_trials": 3, "runs_dir": str(runs), "name": "r",
            "warm_start": False, "space": space}
    return SearchSpec(**{**base, **kw})


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("greenopt.report.plot.write_plots", lambda *a, **k: {})


@pytest.fixture(scope="module")
def paths(tiny_dir, tmp_path_factory) -> dict[str, str]:
    """Every bad (and a few good) inputs, by the name the argv templates use."""
    d = tmp_path_factory.mktemp("bad input")
    (d / "not_utf8.yaml").write_bytes(NOT_UTF8)
    (d / "folder").mkdir()
    (d / "a_file").write_text("not a folder\n")
    (d / "bad.yaml").write_text("steps: [unclosed\n")
    _dump(d / "good.yaml", DEPTH1)
    _dump(d / "backwards.yaml", BACKWARDS_QUANT)
    _dump(d / "backwards_depth.yaml", BACKWARDS_DEPTH)
    pinned = {"model": str(tiny_dir), "variant": DEPTH1, "protocol": "smoke", "evaluation": {"tasks": []},
              "gate": {"target": "G"}}
    _dump(d / "pinned.yaml", pinned)
    _dump(d / "backwards_recipe.yaml", {**pinned, "variant": BACKWARDS_DEPTH})
    searching = {"model": str(tiny_dir), "search": {"target": "B"}}
    _dump(d / "seed_low.yaml", {**searching, "search": {"target": "B", "seed": -1}})
    _dump(d / "seed_high.yaml", {**searching, "search": {"target": "B", "seed": 2**32}})
    (d / "bad_tasks").mkdir()  # a user task folder whose task reads a hub dataset
    _dump(d / "bad_tasks" / "myqa.yaml", {"task": "my_qa", "dataset_path": "cais/mmlu", "output_type": "multiple_choice",
                                          "test_split": "test", "doc_to_text": "{{question}}"})
    _dump(d / "tasks_recipe.yaml", {**pinned, "evaluation": {"tasks": ["my_qa"], "include_path": "bad_tasks"}})
    for name, body in (("card_not_utf8", NOT_UTF8), ("card_corrupt", b"{\"card_version\": 1,"),
                       ("card_fields", b"{}")):
        (d / name).mkdir()
        (d / name / "label.json").write_bytes(body)
    # Run folders: none, a corrupt study, a search.yaml that is not UTF-8, and a real (fake-measured) run.
    spec_text = dump_yaml(_spec(tiny_dir, d))
    for name in ("run_corrupt_db", "run_no_db", "run_not_utf8"):
        (d / name).mkdir()
        (d / name / "search.yaml").write_text(spec_text)
    (d / "run_corrupt_db" / "study.db").write_bytes(b"this is not a sqlite database\n" * 100)
    (d / "run_not_utf8" / "search.yaml").write_bytes(spec_text.encode() + b"# caf\xe9\n")
    search(_spec(tiny_dir, d / "runs"), runner=FakeRunner(num_layers=4))
    out = {p.name.replace(".yaml", "").replace(".", "_"): str(p) for p in d.iterdir()}
    return {**out, "d": str(d), "tiny": str(tiny_dir), "run": str(d / "runs" / "r"),
            "missing": str(d / "no such file.yaml")}


@pytest.fixture
def guarded(monkeypatch):
    """Fails a case that gets as far as running a search or a worker (it should have stopped before)."""
    def reached(*a, **k):
        raise AssertionError("bad input reached the search")

    monkeypatch.setattr(cli_search, "search", reached)
    monkeypatch.setattr(cli_search, "worker", reached)


def _argv(template: str, paths: dict[str, str]) -> list[str]:
    return [part.format(**paths) for part in template.split("|")]


# (id, argv as "|"-separated template over `paths`, words the error line must hold)
M = "measure|--model|{tiny}|--protocol|smoke|--tasks|--meter|estimate|--device|cpu"
S = "search|--model|{tiny}|--runs-dir|{d}/runs-bad|--tasks|arc_easy"
W = "worker|--storage|sqlite:///{d}/workers.db|--study|nope"
A = "apply|--model|{tiny}|--out|{d}/apply-out"
V = "verify|{pinned}|--meter|estimate|--device|cpu"
E = "export|{run}|--out|{d}/export-out"
CASES = [
    # --- top level and env
    ("unknown command", "deploy", ["invalid choice: 'deploy'"]),
    ("unknown top-level flag", "--colour|env", ["unrecognized arguments: --colour"]),
    ("env unknown flag", "env|--all", ["unrecognized arguments: --all"]),
    ("env extra argument", "env|nvml", ["unrecognized arguments: nvml"]),
    # --- measure
    ("measure no model", "measure|--protocol|smoke", ["--model"]),
    ("measure threads 0", M + "|--threads|0", ["--threads", "0 is out of range"]),
    ("measure threads negative", M + "|--threads|-2", ["--threads", "-2"]),
    ("measure threads not a number", M + "|--threads|two", ["--threads", "'two' is not a whole number"]),
    ("measure limit negative", M + "|--limit|-1", ["--limit", "0 = full sets"]),
    ("measure intensity negative", M + "|--intensity|-1", ["--intensity", "-1"]),
    ("measure intensity nan", M + "|--intensity|nan", ["--intensity", "finite"]),
    ("measure intensity inf", M + "|--intensity|inf", ["--intensity", "finite"]),
    ("measure trials absurd", M + "|--trials|1000000000", ["--trials", "1 to 1000"]),
    ("measure trials 0", M + "|--trials|0", ["--trials"]),
    ("measure new tokens 0", M + "|--new-tokens|0", ["new_tokens"]),
    ("measure prompt tokens negative", M + "|--prompt-tokens|-5", ["prompt_tokens"]),
    ("measure batch size 0", M + "|--batch-size|0", ["batch_size"]),
    ("measure cpu watts negative", M + "|--cpu-watts|-1", ["--cpu-watts"]),
    ("measure unknown protocol", "measure|--model|{tiny}|--protocol|fast", ["unknown protocol preset 'fast'"]),
    ("measure unknown meter", M + "|--meter|wattmeter", ["meter"]),
    ("measure unknown dtype", M + "|--dtype|int3", ["dtype"]),
    ("measure task twice", "measure|--model|{tiny}|--tasks|arc_easy|arc_easy", ["listed twice"]),
    ("measure variant not utf8", M + "|--variant|{not_utf8}", ["not_utf8.yaml", "not UTF-8 text"]),
    ("measure variant is a folder", M + "|--variant|{folder}", ["folder", "is a folder"]),
    ("measure variant missing", M + "|--variant|{missing}", ["no such file"]),
    ("measure variant bad yaml", M + "|--variant|{bad}", ["not valid YAML"]),
    ("measure variant layers backwards", M + "|--variant|{backwards}", ["layers", "runs backwards"]),
    ("measure scheme not utf8", M + "|--scheme|{not_utf8}", ["not UTF-8 text"]),
    ("measure out inside a file", M + "|--out|{a_file}/card", ["--out", "is a file"]),
    ("measure model missing", "measure|--model|{d}/no-model|--protocol|smoke|--tasks", ["no such model folder"]),
    ("measure hub task", M + "|--tasks|mmlu", ["task 'mmlu'", "needs the hub dataset cais/mmlu", "--include-path"]),
    ("measure task file hub dataset", M + "|--include-path|{bad_tasks}|--tasks|my_qa",
     ["myqa.yaml: field 'dataset_path': 'cais/mmlu' is a hub dataset", "dataset_path: json"]),
    ("measure include path missing", M + "|--include-path|{d}/no-tasks|--tasks|my_qa",
     ["--include-path", "no such folder"]),
    ("measure include path empty", M + "|--include-path||--tasks|my_qa", ["--include-path", "empty path"]),
    # --- search (recipe and flags)
    ("search threads 0", S + "|--threads|0", ["--threads"]),
    ("search threads negative", S + "|--threads|-1", ["--threads"]),
    ("search seed negative", S + "|--seed|-1", ["seed", "greater than or equal to 0"]),
    ("search seed 2**32", S + "|--seed|4294967296", ["seed", "less than or equal to 4294967295"]),
    ("search limit negative", S + "|--limit|-1", ["--limit"]),
    ("search budget absurd", S + "|--budget|1000000000000", ["--budget", "1 to 100000"]),
    ("search budget 0", S + "|--budget|0", ["--budget"]),
    ("search max drop above 1", S + "|--max-drop|2", ["max_drop"]),
    ("search lowercase target", S + "|--target|b", ["target"]),
    ("search negative timeout", S + "|--timeout|-5", ["timeout_s"]),
    ("search unknown sampler", S + "|--sampler|cmaes", ["invalid choice: 'cmaes'"]),
    ("search bad name", S + "|--name|a/b", ["name"]),
    ("search depth max 1.5", S + "|--depth-max|1.5", ["depth_drop_max"]),
    ("search bits 5", S + "|--bits|5", ["bits"]),
    ("search moefy 0", S + "|--moefy|0", ["moefy_experts"]),
    ("search unknown protocol", S + "|--protocol|turbo", ["turbo"]),
    ("search runs dir is a file", "search|--model|{tiny}|--runs-dir|{a_file}", ["--runs-dir", "is a file"]),
    ("search recipe not utf8", "search|{not_utf8}", ["not UTF-8 text"]),
    ("search recipe is a folder", "search|{folder}", ["is a folder"]),
    ("search recipe missing", "search|{missing}", ["no such file"]),
    ("search pinned recipe", "search|{pinned}", ["has no search section"]),
    ("search recipe seed negative", "search|{seed_low}", ["seed"]),
    ("search recipe seed 2**32", "search|{seed_high}", ["seed"]),
    ("search hub task", S + "|winogrande", ["task 'winogrande'", "local datasets cache", "offline task"]),
    ("search task file hub dataset", S + "|my_qa|--include-path|{bad_tasks}", ["myqa.yaml", "field 'dataset_path'"]),
    # --- worker
    ("worker trials 0", W + "|--trials|0", ["--trials"]),
    ("worker trials negative", W + "|--trials|-1", ["--trials"]),
    ("worker threads 0", W + "|--threads|0", ["--threads"]),
    ("worker no storage", "worker|--study|x", ["--storage"]),
    ("worker runs dir is a file", W + "|--runs-dir|{a_file}", ["--runs-dir", "is a file"]),
    # --- apply
    ("apply threads 0", A + "|--variant|{good}|--threads|0", ["--threads"]),
    ("apply threads negative", A + "|--variant|{good}|--threads|-4", ["--threads"]),
    ("apply recipe layers backwards", "apply|{backwards_recipe}|--out|{d}/apply-out", ["layers", "runs backwards"]),
    ("apply variant layers backwards", A + "|--variant|{backwards}", ["layers", "runs backwards"]),
    ("apply depth layers backwards", A + "|--variant|{backwards_depth}", ["depth.layers", "runs backwards"]),
    ("apply variant not utf8", A + "|--variant|{not_utf8}", ["not UTF-8 text"]),
    ("apply variant is a folder", A + "|--variant|{folder}", ["is a folder"]),
    ("apply variant missing", A + "|--variant|{missing}", ["no such file"]),
    ("apply variant bad yaml", A + "|--variant|{bad}", ["not valid YAML"]),
    ("apply nothing", "apply", ["needs a recipe file"]),
    ("apply recipe and model", "apply|{pinned}|--model|{tiny}", ["not both"]),
    ("apply no out", "apply|--model|{tiny}|--variant|{good}", ["--out"]),
    ("apply out exists", "apply|--model|{tiny}|--variant|{good}|--out|{a_file}", ["already exists"]),
    ("apply out inside a file", "apply|--model|{tiny}|--variant|{good}|--out|{a_file}/x", ["is a file"]),
    ("apply search recipe", "apply|{seed_low}|--out|{d}/apply-out", ["seed"]),
    ("apply unknown dtype", A + "|--variant|{good}|--dtype|int3", ["int3"]),
    ("apply model missing", "apply|--model|{d}/no-model|--variant|{good}|--out|{d}/apply-out",
     ["no such model folder"]),
    # --- export
    ("export no out", "export|{run}", ["--out"]),
    ("export missing run", "export|{d}/no-run|--out|{d}/export-out", ["not a search run folder"]),
    ("export empty folder", "export|{folder}|--out|{d}/export-out", ["not a search run folder"]),
    ("export corrupt study", "export|{run_corrupt_db}|--out|{d}/export-out", ["study.db", "not a database"]),
    ("export no study", "export|{run_no_db}|--out|{d}/export-out", ["no study"]),
    ("export spec not utf8", "export|{run_not_utf8}|--out|{d}/export-out", ["search.yaml", "not UTF-8 text"]),
    ("export pick not a number", E + "|--pick|abc", ["--pick 'abc'"]),
    ("export pick missing trial", E + "|--pick|999", ["trial 999"]),
    ("export out exists", "export|{run}|--out|{a_file}", ["already exists"]),
    ("export out inside a file", "export|{run}|--out|{a_file}/x", ["is a file"]),
    # --- verify
    ("verify threads 0", V + "|--threads|0", ["--threads"]),
    ("verify threads negative", V + "|--threads|-3", ["--threads"]),
    ("verify limit 0", V + "|--limit|0", ["--limit", "recorded limit"]),
    ("verify limit negative", V + "|--limit|-1", ["--limit"]),
    ("verify negative budget", V + "|--max-drop|-0.5", ["max_drop"]),
    ("verify unknown tier", V + "|--require-tier|M3", ["invalid choice: 'M3'"]),
    ("verify cpu watts 0", V + "|--cpu-watts|0", ["cpu_watts"]),
    ("verify recipe not utf8", "verify|{not_utf8}", ["not UTF-8 text"]),
    ("verify recipe layers backwards", "verify|{backwards_recipe}", ["runs backwards"]),
    ("verify card out inside a file", V + "|--card-out|{a_file}/card", ["--card-out", "is a file"]),
    ("verify no source", "verify", ["source"]),
    # --- label
    ("label missing folder", "label|{d}/no-export", ["no label card there"]),
    ("label empty folder", "label|{folder}", ["no label card there"]),
    ("label a file", "label|{a_file}", ["is a file"]),
    ("label card not utf8", "label|{card_not_utf8}", ["label.json", "not UTF-8 text"]),
    ("label card corrupt", "label|{card_corrupt}", ["label.json", "not valid JSON"]),
    ("label card fields", "label|{card_fields}", ["label.json"]),
    # --- recipe
    ("recipe no action", "recipe", ["recipe needs an action"]),
    ("recipe validate no files", "recipe|validate", ["files"]),
    ("recipe unknown action", "recipe|lint|{pinned}", ["invalid choice: 'lint'"]),
]


@pytest.mark.parametrize("template,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(template, needles, paths, guarded, capsys):
    one_line_error(capsys, main(_argv(template, paths)), *needles)


def test_battery_is_large_and_names_are_unique():
    assert len(CASES) + len(RECIPE_REPORTS) + len(READ_ONLY) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------- recipe validate's report

# `recipe validate` reports every problem as `FILE: FIELD: MESSAGE` (the linter's format, one line
# each) and exits 1; a file it cannot read is one such line at <file>.
RECIPE_REPORTS = [
    pytest.param("not_utf8", "<file>", "not UTF-8 text", id="not utf8"),
    pytest.param("folder", "<file>", "is a folder", id="a folder"),
    pytest.param("missing", "<file>", "no such file", id="missing"),
    pytest.param("bad", "<file>", "not valid YAML", id="bad yaml"),
    pytest.param("backwards_recipe", "variant.steps.0.depth.layers", "runs backwards", id="layers backwards"),
    pytest.param("seed_low", "search.seed", "greater than or equal to 0", id="seed negative"),
    pytest.param("tasks_recipe", "evaluation.include_path", "myqa.yaml: field 'dataset_path'", id="task file"),
]


@pytest.mark.parametrize("key,field,words", RECIPE_REPORTS)
def test_recipe_validate_reports_unreadable_files(key, field, words, paths, capsys):
    rc = main(["recipe", "validate", paths[key], "--no-dry-run"])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 1 and "Traceback" not in cap.out + cap.err
    assert len(lines) == 1 and lines[0].startswith(f"{paths[key]}: {field}: ") and words in lines[0], lines


# ---------------------------------------------------------------------------- read-only output folders


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder nothing can be written in: chmod 0555, or (as root, where chmod does not stop
    writes) a simulated read-only file system for every write under it."""
    ro = tmp_path / "read only"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root
        real_access, real_mkstemp, real_mkdtemp, real_mkdir = os.access, _io.tempfile.mkstemp, \
            _io.tempfile.mkdtemp, os.mkdir

        def under(p) -> bool:
            return Path(os.path.abspath(p)).is_relative_to(ro)

        def rofs(p):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))

        monkeypatch.setattr(os, "access", lambda p, mode, **k: not (mode & os.W_OK and under(p))
                            and real_access(p, mode, **k))
        monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: rofs(p) if under(p) else real_mkdir(p, *a, **k))
        monkeypatch.setattr(_io.tempfile, "mkstemp", lambda *a, dir=None, **k: rofs(dir) if under(dir) else
                            real_mkstemp(*a, dir=dir, **k))
        monkeypatch.setattr(_io.tempfile, "mkdtemp", lambda *a, dir=None, **k: rofs(dir) if under(dir) else
                            real_mkdtemp(*a, dir=dir, **k))
    yield ro
    ro.chmod(0o755)


READ_ONLY = [
    ("measure --out", M + "|--out|{ro}/card"),
    ("apply --out", "apply|--model|{tiny}|--variant|{good}|--out|{ro}/export"),
    ("export --out", "export|{run}|--out|{ro}/export"),
    ("verify --card-out", V + "|--card-out|{ro}/card"),
    ("search --runs-dir", S.replace("{d}/runs-bad", "{ro}/runs")),
    ("worker --runs-dir", W + "|--runs-dir|{ro}/runs"),
    ("label", "label|{ro}"),
]


@pytest.mark.parametrize("template", [c[1] for c in READ_ONLY], ids=[c[0] for c in READ_ONLY])
def test_read_only_output_folder_fails_before_any_work(template, paths, exported, read_only, guarded, capsys):
    if template.startswith("label"):  # a good card in a folder that cannot take the re-rendered files
        read_only.chmod(0o755)
        shutil.copy(exported / "label.json", read_only / "label.json")
        read_only.chmod(0o555)
    line = one_line_error(capsys, main(_argv(template, {**paths, "ro": str(read_only)})), str(read_only))
    assert "choose a writable" in line
    assert sorted(p.name for p in read_only.iterdir()) in ([], ["label.json"])


@pytest.fixture(scope="module")
def exported(paths) -> Path:
    """The fake run's baseline trial exported (a real label card and manifest)."""
    out = Path(paths["d"]) / "exported"
    assert main(["export", paths["run"], "--pick", "0", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------- a full disk


@pytest.fixture
def full_disk(tmp_path, monkeypatch) -> Path:
    """Every atomic write under ``tmp_path`` fails with ENOSPC when it is put in place."""
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if Path(os.path.abspath(dst)).is_relative_to(tmp_path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    return tmp_path


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(full_disk):
    target = full_disk / "result.json"
    target.write_text("old\n")
    with pytest.raises(GreenoptError, match=r"cannot write .*result\.json: no space left on device; free some"):
        _io.write_json(target, {"new": 1})
    assert target.read_text() == "old\n" and _leftovers(full_disk) == []


def test_atomic_write_into_a_file_names_the_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(GreenoptError, match=r"cannot write .*f/card\.json: .*a part of the path is a file"):
        _io.write_text(tmp_path / "f" / "card.json", "{}")


def test_label_on_a_full_disk(exported, full_disk, capsys):
    folder = full_disk / "export"
    shutil.copytree(exported, folder)
    before = (folder / "label.json").read_bytes()
    one_line_error(capsys, main(["label", str(folder)]), "cannot write", "no space left on device")
    assert (folder / "label.json").read_bytes() == before and _leftovers(full_disk) == []


@pytest.mark.parametrize("command", ["apply|--model|{tiny}|--variant|{good}", "export|{run}|--pick|0"])
def test_export_on_a_full_disk(command, paths, full_disk, capsys):
    out = full_disk / "export"
    one_line_error(capsys, main(_argv(command, paths) + ["--out", str(out), "--json"]), "no space left on device")
    assert not out.exists() and _leftovers(full_disk) == []  # the partial export folder is gone


def test_measure_on_a_full_disk(paths, full_disk, capsys):
    out = full_disk / "card"
    argv = _argv(M, paths) + ["--out", str(out), "--json"]
    one_line_error(capsys, main(argv), str(out), "no space left on device")
    assert not out.exists() and _leftovers(full_disk) == []  # no half a card


def test_search_on_a_full_disk(paths, full_disk, monkeypatch, capsys):
    _fake_search(monkeypatch)
    argv = ["search", "--model", paths["tiny"], "--runs-dir", str(full_disk / "runs"), "--name", "full",
            "--target", "G", "--budget", "3"]
    one_line_error(capsys, main(argv), "cannot write", "no space left on device")
    assert _leftovers(full_disk) == []


def _fake_search(monkeypatch, runner=None) -> None:
    real = cli_search.search
    monkeypatch.setattr(cli_search, "search",
                        lambda spec, **kw: real(spec, runner=runner or FakeRunner(num_layers=4), **kw))


# ---------------------------------------------------------------------------- the last resort, Ctrl-C


@pytest.mark.parametrize("error,words", [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/x/study.db"), "/srv/x/study.db: Permission denied"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "runs/trials"), "runs/trials: Not a directory"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (OSError("a library's message\nover two lines"), "a library's message over two lines"),
], ids=["permission", "not a directory", "no filename", "two lines"])
def test_a_bare_os_error_is_one_line(error, words, monkeypatch, capsys):
    def handler(args):
        raise error

    monkeypatch.setitem(cli_search.HANDLERS, "search", handler)
    line = one_line_error(capsys, main(["search"]))
    assert line == f"greenopt: error: {words}"


def test_interrupted_search_exits_130_with_the_resume_hint(paths, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def interrupt(variant):
        calls["n"] += 1
        return KeyboardInterrupt() if calls["n"] == 2 else None

    _fake_search(monkeypatch, FakeRunner(num_layers=4, fail=interrupt))
    argv = ["search", "--model", paths["tiny"], "--runs-dir", str(tmp_path), "--name", "stop", "--target", "G",
            "--budget", "4"]
    assert main(argv) == 130
    assert "--resume" in capsys.readouterr().out
    calls["n"] = 10  # no more interrupts: the run continues and finishes
    assert main([*argv, "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["interrupted"] is False


def test_usage_error_in_a_subprocess():
    argv = ["worker", "--storage", "sqlite:///x.db", "--study", "s", "--trials", "0"]
    proc = subprocess.run([sys.executable, "-c", "import sys; from greenopt.cli import main; sys.exit(main())", *argv],
                          capture_output=True, text=True, timeout=120, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    expected = "greenopt: error: argument --trials: 0 is out of range; pass 1 to 100000; see greenopt worker --help"
    assert lines == [expected]


# ---------------------------------------------------------------------------- the fixes at their source


def test_search_limit_0_means_full_sets_and_a_recipe_keeps_its_own(paths):
    def spec(*extra):
        args = build_parser().parse_args(["search", "--model", paths["tiny"], *extra])
        return cli_search._spec_from_args(args)

    assert spec("--limit", "0").fidelity.eval.limit is None
    assert spec("--limit", "7").fidelity.eval.limit == 7
    assert spec().fidelity.eval.limit == 100


@pytest.mark.parametrize("step", [
    {"kind": "depth", "layers": "3-1"}, {"kind": "width", "ffn_keep": 0.5, "layers": "3-1"},
    {"kind": "moefy", "experts": 4, "layers": "3-1"}, {"kind": "prune", "target": {"layers": "3-1"}},
    {"kind": "quantize", "overrides": [{"target": {"layers": "2-0"}, "bits": 8}]},
], ids=["depth", "width", "moefy", "prune target", "quantize override"])
def test_backwards_layer_range_is_a_validation_error(step):
    with pytest.raises(ConfigError, match=r"^v\.yaml: steps\.0\.\w+\..*layers: Value error, layer range '\d-\d' "
                                          r"runs backwards; write it low-high"):
        validated(Variant, {"steps": [step]}, where="v.yaml")


def test_good_layer_ranges_still_load(paths, tmp_path):
    f = _dump(tmp_path / "v.yaml", {"steps": [{"kind": "depth", "layers": "1-2"},
                                              {"kind": "width", "ffn_keep": 0.5, "layers": "0,3"}]})
    assert [s.layers for s in load_variant(f).steps] == ["1-2", "0,3"]


def test_seed_range_on_the_spec():
    assert SearchSpec(seed=0).seed == 0 and SearchSpec(seed=2**32 - 1).seed == 2**32 - 1
    for bad in (-1, 2**32):
        with pytest.raises(ConfigError, match="seed"):
            validated(SearchSpec, {"seed": bad})
    with pytest.raises(ConfigError, match="n_trials"):
        validated(SearchSpec, {"n_trials": 10**12})


def test_unreadable_and_bom_files(tmp_path, monkeypatch):
    f = tmp_path / "r.yaml"
    f.write_bytes(b"\xef\xbb\xbfsteps: []\n")  # a UTF-8 BOM (Windows editors) is legal
    assert load_yaml(f) == {"steps": []}
    real = Path.read_text

    def denied(self, *a, **k):
        if self == f:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=r"r\.yaml: cannot read it \(permission denied\)"):
        load_recipe(f)


def test_export_ignores_a_corrupt_trial_cache(paths, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(paths["run"], run)
    for f in (run / "trials").glob("*.json"):
        f.write_text("{ corrupt")
    (run / "environment.json").write_bytes(b"\xff not json")
    out = tmp_path / "export"
    assert main(["export", str(run), "--pick", "0", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert "environment.json ignored" in caplog.text


# ---------------------------------------------------------------------------- legal input that must work


def test_apply_to_a_unicode_path_with_spaces(paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = Path("ünï code") / "dir x"
    assert main(["apply", "--model", paths["tiny"], "--variant", paths["good"], "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["variant"]["steps"][0]["layers"] == "1"
    assert (tmp_path / out / "greenopt_export.json").is_file()


def test_measure_at_zero_carbon_into_a_unicode_path(paths, tmp_path, capsys):
    out = tmp_path / "çarte dir" / "ünï"
    assert main(_argv(M, paths) + ["--intensity", "0", "--out", str(out), "--json"]) == 0
    carbon = json.loads(capsys.readouterr().out)["card"]["carbon"]
    assert carbon["intensity_g_per_kwh"] == 0 and carbon["g_per_1k_tokens"] == 0
    assert "0 g/kWh" in (out / "LABEL.md").read_text()


def test_search_in_a_unicode_runs_dir(paths, tmp_path, monkeypatch, capsys):
    _fake_search(monkeypatch)
    runs = tmp_path / "rüns dir"
    argv = ["search", "--model", paths["tiny"], "--runs-dir", str(runs), "--name", "u", "--target", "G",
            "--budget", "3", "--limit", "0", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["n_trials"] == 3
    assert run_dir(load_spec(runs / "u" / "search.yaml")).study_db.is_file()


def load_spec(path: Path) -> SearchSpec:
    spec = validated(SearchSpec, load_yaml(path))
    assert spec.fidelity.eval.limit is None
    return spec
