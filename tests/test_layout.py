"""The layout check (scripts/check_imports.py): zero cycles and no upward import today, and it
fails when either appears."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_imports.py"


def _check(package: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--package", str(package)], capture_output=True, text=True)


def test_the_package_has_no_cycle_and_no_upward_import():
    r = _check(ROOT / "greenopt")
    assert r.returncode == 0, r.stdout
    assert " 0 cycles" in r.stdout and " 0 upward imports" in r.stdout


def test_an_upward_import_and_its_cycle_fail_the_check(tmp_path):
    pkg = tmp_path / "greenopt"
    shutil.copytree(ROOT / "greenopt", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    base = pkg / "records" / "_base.py"
    base.write_text(base.read_text() + "\nfrom greenopt.search import pareto  # noqa: F401\n")
    r = _check(pkg)
    assert r.returncode == 1
    assert "upward import: greenopt.records._base (floor 2) -> greenopt.search.pareto" in r.stdout
    assert "import cycle:" in r.stdout


def test_a_module_on_no_floor_fails_the_check(tmp_path):
    pkg = tmp_path / "greenopt"
    shutil.copytree(ROOT / "greenopt", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "stray.py").write_text('"""a module nobody placed"""\n')
    r = _check(pkg)
    assert r.returncode == 1 and "module greenopt.stray is on no floor" in r.stdout


def test_a_sibling_imported_through_its_package_is_a_cycle(tmp_path):
    pkg = tmp_path / "greenopt"
    shutil.copytree(ROOT / "greenopt", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    confirm = pkg / "search" / "confirm.py"  # the package __init__ imports _loop, which imports confirm
    confirm.write_text(confirm.read_text().replace("import greenopt.search.pareto as pareto",
                                                   "from greenopt.search import pareto"))
    r = _check(pkg)
    assert r.returncode == 1
    assert "import cycle: greenopt.search <-> greenopt.search._loop <-> greenopt.search.confirm" in r.stdout


def test_a_lazy_import_counts_for_the_floors_but_not_for_cycles(tmp_path):
    pkg = tmp_path / "greenopt"
    shutil.copytree(ROOT / "greenopt", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    base = pkg / "records" / "_base.py"
    base.write_text(base.read_text() + "\n\ndef _later():\n    from greenopt.search import pareto"
                    "  # lazy: test  # noqa: F401\n")
    r = _check(pkg)
    assert "import cycle:" not in r.stdout
    assert r.returncode == 1 and "upward import: greenopt.records._base" in r.stdout
