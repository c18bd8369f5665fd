"""The baseline accuracy cache: a second call reads the stored result; every part of the key
(model files, dtype, device, tasks, items, user task files) scores afresh; a damaged file is
recomputed; GREENOPT_EVAL_CACHE=0 turns it off; ``greenopt measure`` says when it was used."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml
from test_user_tasks import write_tasks

from greenopt.cli import main
from greenopt.config import EvalSpec
from greenopt.errors import WriteError
from greenopt.evaluate import cache
from greenopt.records import EvalResult, ModelInfo
from greenopt.testing import tiny_llama, tiny_tokenizer


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENOPT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(cache.ENV, raising=False)
    return tmp_path / "home"


@pytest.fixture
def tasks(tmp_path):
    return write_tasks(tmp_path / "tasks")


@pytest.fixture
def scored(monkeypatch):
    """Counts the real evaluations behind baseline_eval."""
    calls = []
    real = cache.evaluate

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(cache, "evaluate", counting)
    return calls


@pytest.fixture(scope="module")
def model():
    return tiny_llama(), tiny_tokenizer()


def spec(folder, **kw) -> EvalSpec:
    return EvalSpec(**{"tasks": ("my_qa", "my_cloze"), "limit": 4, "seed": 5, "include_path": str(folder), **kw})


def stored(home):
    return sorted((home / "evals" / "baselines").glob("*.json"))


def test_second_call_reads_the_cache(home, tasks, model, scored, caplog):
    first = cache.baseline_eval(*model, spec(tasks), key="m", keep_items=True)
    with caplog.at_level(logging.INFO, logger="greenopt.evaluate.cache"):
        second = cache.baseline_eval(*model, spec(tasks), key="m", keep_items=True)
    assert len(scored) == 1 and (first.cached, second.cached) == (False, True)
    assert second.scores == first.scores and second.scores[0].items is not None
    assert second.model_copy(update={"cached": False}) == first
    assert any("read from the cache" in r.getMessage() for r in caplog.records)
    [path] = stored(home)
    assert json.loads(path.read_text())["result"]["cached"] is False  # the stored record is the computed one


@pytest.mark.parametrize("change", [
    {"limit": 3}, {"seed": 6}, {"batch_size": 2}, {"num_fewshot": 1}, {"tasks": ("my_qa",)},
    {"key": "another model"}, {"keep_items": True},
])
def test_each_part_of_the_key_scores_afresh(change, home, tasks, model, scored):
    change = dict(change)
    key, keep = change.pop("key", "m"), change.pop("keep_items", False)
    cache.baseline_eval(*model, spec(tasks), key="m")
    again = cache.baseline_eval(*model, spec(tasks, **change), key=key, keep_items=keep)
    assert not again.cached and len(scored) == 2 and len(stored(home)) == 2


def test_an_edited_user_task_or_its_data_scores_afresh(home, tasks, model, scored):
    cache.baseline_eval(*model, spec(tasks), key="m")
    rows = (tasks / "data" / "cloze.jsonl").read_text().splitlines()
    (tasks / "data" / "cloze.jsonl").write_text("\n".join(rows[::-1]) + "\n")
    assert not cache.baseline_eval(*model, spec(tasks), key="m").cached
    (tasks / "utils.py").write_text((tasks / "utils.py").read_text() + "# edited\n")
    assert not cache.baseline_eval(*model, spec(tasks), key="m").cached
    assert cache.baseline_eval(*model, spec(tasks), key="m").cached
    assert len(scored) == 3


@pytest.mark.parametrize("damage", ["{not json", '{"key": {}, "result": {}}', "[]", ""])
def test_a_damaged_file_is_recomputed_and_overwritten(damage, home, tasks, model, scored, caplog):
    cache.baseline_eval(*model, spec(tasks), key="m")
    [path] = stored(home)
    good = path.read_text()
    path.write_text(damage)
    with caplog.at_level(logging.WARNING, logger="greenopt.evaluate.cache"):
        res = cache.baseline_eval(*model, spec(tasks), key="m")
    assert not res.cached and len(scored) == 2
    assert any("damaged" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert json.loads(path.read_text()) == json.loads(good)


def test_off_by_env_and_without_a_model_identity(home, tasks, model, scored, monkeypatch):
    assert not cache.baseline_eval(*model, spec(tasks), key=None).cached
    monkeypatch.setenv(cache.ENV, "0")
    for _ in range(2):
        assert not cache.baseline_eval(*model, spec(tasks), key="m").cached
    assert len(scored) == 3 and stored(home) == []


def test_a_failed_write_keeps_the_scores(home, tasks, model, monkeypatch, caplog):
    def full(path, obj):
        raise WriteError(f"cannot write {path}: no space left on device")

    monkeypatch.setattr(cache, "write_json", full)
    with caplog.at_level(logging.WARNING, logger="greenopt.evaluate.cache"):
        res = cache.baseline_eval(*model, spec(tasks), key="m")
    assert res.scores and not res.cached and "not cached" in caplog.text


def info(path, source="local") -> ModelInfo:
    return ModelInfo(model_id="tiny", source=source, path=str(path), architecture="LlamaForCausalLM", num_layers=4,
                     num_params=1000, dtype="float32", device="cpu")


def test_model_key_follows_the_files_dtype_and_device(tmp_path):
    folder = tmp_path / "ckpt"
    tiny_llama().save_pretrained(folder)
    key = cache.model_key(info(folder), "float32", "cpu")
    assert key == cache.model_key(info(folder), "float32", "cpu")
    assert key != cache.model_key(info(folder), "bfloat16", "cpu") != cache.model_key(info(folder), "float32", "cuda")
    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # re-saved in place, same size
    assert cache.model_key(info(folder), "float32", "cpu") != key
    assert cache.model_key(info(tmp_path / "gone"), "float32", "cpu") is None
    assert cache.model_key(info("nobody/not-cached-model", source="hub"), "float32", "cpu") is None


def test_eval_result_reads_records_written_before_the_cached_field():
    old = {"scores": [], "limit": 5, "seed": 1}
    assert EvalResult.model_validate(old).cached is False


def test_measure_scores_the_baseline_once_and_says_so(home, tasks, tiny_dir, tmp_path, capsys):
    variant = tmp_path / "depth.yaml"
    variant.write_text(yaml.safe_dump({"steps": [{"kind": "depth", "layers": "1"}]}))
    argv = ["measure", "--model", str(tiny_dir), "--variant", str(variant), "--protocol", "smoke", "--meter",
            "estimate", "--cpu-watts", "10", "--device", "cpu", "--comparisons", "1", "--tasks", "my_qa",
            "--include-path", str(tasks), "--limit", "4"]
    docs = []
    for i in range(2):
        assert main([*argv, "--out", str(tmp_path / f"card{i}"), "--json"]) == 0
        docs.append(json.loads(capsys.readouterr().out))
    assert [d["baseline_eval_cached"] for d in docs] == [False, True]
    assert [t["baseline"] for t in docs[0]["card"]["accuracy"]] == [t["baseline"] for t in docs[1]["card"]["accuracy"]]
    assert main([*argv, "--out", str(tmp_path / "card2")]) == 0
    assert "baseline accuracy read from the cache" in capsys.readouterr().out


def test_a_scorer_setting_scores_afresh(home, tasks, model, scored, monkeypatch):
    cache.baseline_eval(*model, spec(tasks), key="m")
    monkeypatch.setenv("GREENOPT_EVAL_LM", "hflm")  # lm-eval's own wrapper instead of greenopt's
    assert not cache.baseline_eval(*model, spec(tasks), key="m").cached
    assert len(scored) == 2 and len(stored(home)) == 2


def test_offline_tasks_are_keyed_by_their_data_fingerprint(tasks):
    from greenopt.evaluate.tasks import data_fingerprint

    offline = cache.eval_key(EvalSpec(tasks=("arc_easy", "my_qa"), include_path=str(tasks)), model="m")
    assert offline["offline_data"] == data_fingerprint() and offline["user_tasks"] is not None
    assert offline["spec"]["include_path"] == str(tasks.resolve())
    own = cache.eval_key(EvalSpec(tasks=("my_qa",), include_path=str(tasks)), model="m")
    assert own["offline_data"] is None and own["stock_data"] == {}
