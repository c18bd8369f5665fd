"""A plain (non-editable) install of the built wheel finds its package data and measures.

Builds the wheel from this checkout, unpacks it into a fresh folder and runs a tiny
measure-and-grade in a subprocess whose working directory is outside the repository, so
nothing can be read from the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import sys

import greenopt
from greenopt.config import protocol_preset
from greenopt.evaluate import tasks
from greenopt.label import grade_comparison, load_scheme
from greenopt.measure.workload import compare
from greenopt.testing import FakeMeter, tiny_llama, tiny_tokenizer

assert greenopt.__file__.startswith(sys.argv[1]), greenopt.__file__
assert not greenopt.__file__.startswith(sys.argv[2]), "imported from the source tree"
templates = sorted(p.name for p in tasks.evals_source_dir().glob("*.yaml"))
assert len(templates) == len(tasks.OFFLINE_TASKS), templates
eu = load_scheme("relative-eu"); load_scheme("absolute-go1")
model = tiny_llama()
cmp = compare(model, model, tiny_tokenizer(), protocol_preset("smoke"), FakeMeter())
print("graded", grade_comparison(cmp, eu).display)
"""


@pytest.mark.integration
def test_the_built_wheel_ships_schemes_and_templates_and_measures(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next(wheels.glob("greenopt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "greenopt/label/schemes/relative-eu.yaml" in names and "greenopt/label/schemes/absolute-go1.yaml" in names
    assert sum(n.startswith("greenopt/evaluate/templates/") and n.endswith(".yaml") for n in names) >= 6
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(site), str(ROOT)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "graded" in out.stdout
