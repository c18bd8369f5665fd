"""``export_run`` reads the run's trials from its study, not from the ``trials/*.json`` cache."""

from __future__ import annotations

import optuna
import pytest

from greenopt.compress import apply
from greenopt.config import CalibSpec, DepthStep, SearchSpec, Variant, dump_yaml
from greenopt.errors import ConfigError
from greenopt.label import grade_comparison, load_scheme
from greenopt.label.card import load_card
from greenopt.records import TrialRecord
from greenopt.search.rundir import RunDir
from greenopt.ship import export_run, load_manifest
from greenopt.testing import tiny_llama, tiny_tokenizer

CALIB = CalibSpec(samples=4, seq_len=32)


def _comparison_and_evals():
    from test_export import card_comparison, card_evals

    return card_comparison(), card_evals()


def _run(tmp_path):
    """A run folder whose study holds a baseline and one depth trial, as a worker would leave it."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    spec = SearchSpec(model=str(base), target="B", name="r", runs_dir=str(tmp_path / "runs"), calib=CALIB)
    variant = Variant(steps=(DepthStep(drop=1),))
    report = apply(tiny_llama(), variant, tokenizer=tiny_tokenizer(), calib=CALIB)
    cmp, evals = _comparison_and_evals()
    return record_run(RunDir(tmp_path / "runs" / "r"), spec, variant, report, cmp, evals)


def record_run(rd: RunDir, spec: SearchSpec, variant: Variant, report, cmp, evals) -> tuple[RunDir, list]:
    """Writes ``rd``'s search.yaml and a study holding the baseline and one trial of ``variant``
    (records only, no trial files), as a worker on another machine would leave it."""
    rd.trials.mkdir(parents=True)
    rd.spec.write_text(dump_yaml(spec))
    grade = grade_comparison(cmp, load_scheme("relative-eu"))
    recs = [TrialRecord(number=0, state="COMPLETE", variant=Variant(), variant_hash=Variant().hash, is_baseline=True,
                        eval=evals[1], comparison=cmp, grade=grade, energy=100.0, energy_ci=(99.0, 101.0)),
            TrialRecord(number=1, state="COMPLETE", variant=variant, variant_hash=variant.hash, eval=evals[0],
                        comparison=cmp, grade=grade, energy=cmp.eei, energy_ci=cmp.eei_ci, apply=report)]
    study = optuna.create_study(storage=rd.sqlite_url, study_name=spec.resolved_study_name,
                                directions=["maximize", "minimize"])
    dist = optuna.distributions.CategoricalDistribution([0])
    for r in recs:
        study.add_trial(optuna.trial.create_trial(
            params={"x": 0}, distributions={"x": dist}, values=[r.mean_accuracy, r.energy],
            user_attrs={"record": r.model_dump(mode="json"), "variant_hash": r.variant_hash}))
    return rd, recs


def test_export_run_reads_the_study_without_trial_files(tmp_path):
    rd, _ = _run(tmp_path)  # no trials/*.json and no result.json: a worker on another machine ran them
    m = export_run(rd.root, tmp_path / "exp")
    out = load_manifest(tmp_path / "exp")
    assert m == out and out.source.endswith("trial 1") and out.gate.target == "B"
    label = load_card(tmp_path / "exp")
    assert label.relative.display == "B" and label.variant.name == "r-trial1"
    assert [t.task for t in label.accuracy] == ["arc_easy", "piqa"]
    with pytest.raises(ConfigError, match="trial 7 has no full measurement"):
        export_run(rd.root, tmp_path / "exp2", pick=7)


def test_the_study_wins_over_a_stale_trial_file(tmp_path):
    rd, recs = _run(tmp_path)
    stale = recs[1].model_copy(update={"state": "FAIL", "reason": "stale cache"})
    (rd.trials / "00001.json").write_text(stale.model_dump_json())
    (rd.trials / "00002.json").write_text("{not json")  # a corrupt cache file is never read
    export_run(rd.root, tmp_path / "exp", pick=1)
    assert load_manifest(tmp_path / "exp").source.endswith("trial 1")


def test_a_run_without_its_study_says_so(tmp_path):
    rd, _ = _run(tmp_path)
    rd.study_db.unlink()
    with pytest.raises(ConfigError, match="no study"):
        export_run(rd.root, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()
