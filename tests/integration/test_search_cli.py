"""A real 3-trial search end to end on a tiny llama: real moves, real lm-eval, real workload.

The energy figures come from FakeMeter (tier M1, power x wall time), so the test runs on any
machine; everything else (apply, perplexity, lm-eval on offline tasks, the GO-1 smoke
protocol, grading, the study, the run directory) is the real code path of ``search()``.
"""

import json

import optuna
import pytest

from greenopt.config import EvalSpec, FidelitySpec, SearchSpec, SpaceSpec, load_variant
from greenopt.search import records, search
from greenopt.search.runner import TransformersRunner
from greenopt.testing import FakeMeter, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.integration


def test_real_three_trial_search_on_tiny_llama(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = SearchSpec(
        model="tiny-llama", target="G", n_trials=3, seed=0, sampler="random", runs_dir=str(tmp_path),
        space=SpaceSpec(bits=(8, 4), methods=("rtn",), group_size=16, layer_groups=2, prune=("2:4",),
                        depth_drop_max=0.25, ffn_keep_min=0.75),
        fidelity=FidelitySpec(perplexity_windows=2, perplexity_tokens=32, perplexity_cut=1e6,
                              quick_protocol="smoke", energy_cut=None, protocol="smoke", rungs=(8,), final_limit=12,
                              eval=EvalSpec(tasks=("arc_easy",), limit=4, batch_size=4)),
    )
    runner = TransformersRunner(spec, model=tiny_llama(layers=4), tokenizer=tiny_tokenizer(), meter=FakeMeter(), device="cpu")
    stages = []
    res = search(spec, runner=runner, progress=lambda stage, done, total: stages.append(stage))
    recs = records(optuna.load_study(study_name=spec.run_name, storage=f"sqlite:///{tmp_path / spec.run_name / 'study.db'}"))
    assert len(recs) == 3 and recs[0].is_baseline
    assert [r.state for r in recs] == ["COMPLETE"] * 3, [r.reason for r in recs]
    for r in recs:
        assert r.comparison.candidate.protocol_id == "GO-1/b1/p8-n4"
        assert r.rungs[0].limit == 4 and r.rungs[0].n == 4  # every trial: the first rung's 4 items
        assert r.eval.score("arc_easy").n == r.rungs[-1].n in (4, 8)  # a climb to the second rung re-scores on 8
        assert r.final is None or (r.final.limit == 12 and r.final_eval.score("arc_easy").n == 12)
        assert r.grade.worst_letter in "ABCDEFG"
    assert any(r.final is not None for r in recs)  # the finalists (and the baseline) on final_limit items
    assert recs[1].apply.variant_hash == recs[1].variant_hash and recs[1].quick.perplexity > 0
    assert res.chosen is not None and load_variant(tmp_path / spec.run_name / "chosen.yaml").steps == \
        next(r.variant.steps for r in recs if r.number == res.chosen.number)
    assert "trials" in stages and any(s.startswith("eval") for s in stages)
    out = json.loads((tmp_path / spec.run_name / "result.json").read_text())
    assert out["counts"]["COMPLETE"] == 3
    assert (tmp_path / spec.run_name / "pareto.png").is_file()
