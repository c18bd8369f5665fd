"""The user's own lm-eval tasks (--include-path), offline: scoring, seeded subsets, one-line errors;
and stock lm-eval tasks, accepted only when their dataset is in the local datasets cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from greenopt.config import EvalSpec
from greenopt.config.recipe import load_recipe
from greenopt.errors import ConfigError
from greenopt.evaluate import evaluate, seeded_subset, validate_tasks
from greenopt.evaluate import user_tasks as ut
from greenopt.testing import tiny_llama, tiny_tokenizer

QA = {"task": "my_qa", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "data/qa.jsonl"}},
      "output_type": "multiple_choice", "test_split": "test", "process_docs": "PROCESS",
      "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}", "doc_to_choice": "{{choices}}",
      "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}
CLOZE = {"task": "my_cloze", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "data/cloze.jsonl"}},
         "output_type": "loglikelihood", "test_split": "test", "doc_to_text": "{{context}}",
         "doc_to_target": "{{' ' + word}}",
         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
UTILS = "def process(docs):\n    return docs.map(lambda d: {**d, 'question': d['question'].strip()})\n"


def write_tasks(folder: Path, qa: dict | None = None, cloze: dict | None = None) -> Path:
    """A task folder: a multiple-choice task (12 items, a !function process_docs) and a cloze task (10 items)."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = [{"question": f" What is {i} plus one? ", "choices": [str(i + 1), str(i + 2), "red"], "answer": i % 3}
            for i in range(12)]
    (folder / "data" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "data" / "cloze.jsonl").write_text("".join(
        json.dumps({"context": f"The number after {i} is", "word": str(i + 1)}) + "\n" for i in range(10)))
    (folder / "utils.py").write_text(UTILS)
    text = yaml.safe_dump(qa or QA, sort_keys=False).replace("'PROCESS'", "!function utils.process")
    (folder / "myqa.yaml").write_text(text.replace("PROCESS", "!function utils.process"))
    (folder / "mycloze.yaml").write_text(yaml.safe_dump(cloze or CLOZE, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("my tasks"))


def test_tasks_are_found_and_their_relative_data_made_absolute(tasks_dir):
    tasks = ut.load_tasks(tasks_dir)
    assert sorted(tasks) == ["my_cloze", "my_qa"]
    qa = tasks["my_qa"]
    assert qa.file == tasks_dir / "myqa.yaml"
    assert qa.config["dataset_kwargs"]["data_files"]["test"] == str(tasks_dir / "data" / "qa.jsonl")
    assert callable(qa.config["process_docs"]) and qa.data == (tasks_dir / "data" / "qa.jsonl",)
    assert validate_tasks(["my_qa", "arc_easy", "my_cloze"], str(tasks_dir)) == ("my_qa", "arc_easy", "my_cloze")


def test_multiple_choice_and_loglikelihood_tasks_score_per_item(tasks_dir):
    spec = EvalSpec(tasks=("my_qa", "my_cloze"), limit=5, seed=3, batch_size=4, include_path=str(tasks_dir))
    result = evaluate(tiny_llama(), tiny_tokenizer(), spec, keep_items=True)
    assert [s.task for s in result.scores] == ["my_qa", "my_cloze"]
    qa, cloze = result.scores
    assert (qa.metric, cloze.metric) == ("acc_norm", "acc")
    for s in result.scores:
        assert s.n == 5 and s.higher_is_better and s.stderr is not None
        assert len(s.items) == 5 and set(s.items) <= {0.0, 1.0}
        assert s.value == pytest.approx(sum(s.items) / 5)


def test_limit_scores_the_seeded_subset_and_none_the_full_set(tasks_dir, monkeypatch):
    from lm_eval import evaluator

    seen = []
    real = evaluator.evaluate

    def spy(**kw):
        res = real(**kw)
        seen.append((kw["samples"], sorted(s["doc_id"] for s in res["samples"]["my_qa"])))
        return res

    monkeypatch.setattr(evaluator, "evaluate", spy)
    model, tok = tiny_llama(), tiny_tokenizer()
    sub = evaluate(model, tok, EvalSpec(tasks=("my_qa",), limit=4, seed=3, include_path=str(tasks_dir)))
    want = seeded_subset(12, 4, 3, "my_qa")
    assert want != [0, 1, 2, 3] and seen[0] == ({"my_qa": want}, want) and sub.score("my_qa").n == 4
    full = evaluate(model, tok, EvalSpec(tasks=("my_qa",), limit=None, include_path=str(tasks_dir)))
    assert seen[1] == (None, list(range(12))) and full.score("my_qa").n == 12


def test_unknown_name_lists_the_folder_tasks(tasks_dir):
    with pytest.raises(ConfigError, match=r"unknown task 'my_qb'; .*tasks in .*: my_cloze, my_qa"):
        validate_tasks(["my_qb"], str(tasks_dir))


def test_recipe_include_path_is_read_from_the_recipe_folder(tasks_dir, tmp_path):
    shutil.copytree(tasks_dir, tmp_path / "tasks")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"variant": {"steps": []}, "evaluation": {"tasks": ["my_qa"],
                                                                                "include_path": "tasks"}}))
    ev = load_recipe(recipe).evaluation
    assert ev.include_path == str((tmp_path / "tasks").resolve())
    assert ev.eval_spec().include_path == ev.include_path


# ---------------------------------------------------------------------------- one line per bad file

GOOD = yaml.safe_dump({k: v for k, v in QA.items() if k != "process_docs"}, sort_keys=False)
BAD_FILES = [
    ("yaml syntax", GOOD.replace("output_type: multiple_choice", "output_type: [multiple_choice"),
     "myqa.yaml: not valid YAML at line"),
    ("no task", GOOD.replace("task: my_qa\n", ""), "myqa.yaml: field 'task': missing"),
    ("unknown output type", GOOD.replace("multiple_choice", "multiple_choise"),
     "myqa.yaml: field 'output_type': unknown output_type 'multiple_choise'; use one of loglikelihood"),
    ("hub dataset", GOOD.replace("dataset_path: json", "dataset_path: cais/mmlu"),
     ("myqa.yaml: field 'dataset_path': 'cais/mmlu' is a hub dataset; greenopt runs offline, point it at a local "
      "file (dataset_path: json, dataset_kwargs.data_files: ...)")),
    ("missing data file", GOOD.replace("data/qa.jsonl", "data/nope.jsonl"),
     "myqa.yaml: field 'dataset_kwargs.data_files.test': no such file"),
    ("data at a URL", GOOD.replace("data/qa.jsonl", "https://example.com/qa.jsonl"),
     "myqa.yaml: field 'dataset_kwargs.data_files.test': https://example.com/qa.jsonl is a URL"),
    ("function does not import", GOOD.replace("doc_to_target: '{{answer}}'", "doc_to_target: !function nowhere.to"),
     "myqa.yaml: field 'doc_to_target': !function nowhere.to does not import"),
    ("function missing", GOOD.replace("doc_to_target: '{{answer}}'", "doc_to_target: !function utils.nothing"),
     "myqa.yaml: field 'doc_to_target': !function utils.nothing does not import (AttributeError"),
    ("field typo", GOOD.replace("doc_to_text:", "doc_to_txt:"),
     "myqa.yaml: field 'doc_to_txt': not an lm-eval task field; did you mean 'doc_to_text'?"),
    ("split not in data files", GOOD.replace("test_split: test", "test_split: validation"),
     "myqa.yaml: field 'test_split': split 'validation' is not a key of dataset_kwargs.data_files (test)"),
    ("no split", GOOD.replace("test_split: test\n", ""), "myqa.yaml: field 'test_split': missing"),
    ("wrong column", GOOD.replace("{{question}}", "{{questoin}}"),
     "myqa.yaml: field 'doc_to_text': UndefinedError: 'questoin' is undefined"),
    ("a group", GOOD.replace("task: my_qa", "group: mine\ntask: [my_qa]"), "myqa.yaml: field 'group':"),
    ("offline name", GOOD.replace("task: my_qa", "task: arc_easy"),
     "myqa.yaml: field 'task': 'arc_easy' is one of greenopt's offline tasks"),
]


@pytest.mark.parametrize("text,words", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_a_malformed_task_file_is_one_line_naming_file_and_field(text, words, tmp_path):
    folder = write_tasks(tmp_path / "tasks")
    (folder / "myqa.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        validate_tasks(["my_qa"], str(folder))
    line = str(err.value)
    assert "\n" not in line and line.startswith(str(folder)), line
    assert words in line, line


def test_a_broken_file_fails_even_when_another_task_is_named_and_a_fix_is_seen(tmp_path):
    folder = write_tasks(tmp_path / "tasks")
    (folder / "mycloze.yaml").write_text("task: my_cloze\ndataset_path: [\n")
    with pytest.raises(ConfigError, match=r"mycloze.yaml: not valid YAML at line \d"):
        validate_tasks(["my_qa"], str(folder))
    (folder / "mycloze.yaml").write_text(yaml.safe_dump(CLOZE))
    assert validate_tasks(["my_qa"], str(folder)) == ("my_qa",)  # the edit is read, not a stale scan


def test_a_bad_data_file_names_the_data_field(tmp_path):
    folder = write_tasks(tmp_path / "tasks")
    (folder / "data" / "cloze.jsonl").write_text('{"context": "a", "word": "b"}\n{broken\n')
    with pytest.raises(ConfigError, match=r"mycloze.yaml: field 'dataset_kwargs.data_files': .*JSON parse error"):
        validate_tasks(["my_cloze"], str(folder))


def test_a_task_name_defined_twice_names_both_files(tmp_path):
    folder = write_tasks(tmp_path / "tasks")
    shutil.copytree(folder / "data", folder / "sub" / "data")
    shutil.copy(folder / "mycloze.yaml", folder / "sub" / "again.yaml")
    with pytest.raises(ConfigError, match=r"again.yaml: field 'task': 'my_cloze' is also defined in .*/mycloze.yaml"):
        validate_tasks(["my_qa"], str(folder))


def test_include_path_that_is_not_a_task_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        validate_tasks(["my_qa"], str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.yaml task file"):
        validate_tasks(["my_qa"], str(tmp_path / "empty"))


def test_an_included_base_and_a_local_data_folder(tmp_path):
    folder = write_tasks(tmp_path / "tasks")
    base = {k: v for k, v in CLOZE.items() if k not in ("task", "dataset_path", "dataset_kwargs")}
    (folder / "_base_yaml").write_text(yaml.safe_dump(base))
    (folder / "cloze_dir").mkdir()
    shutil.copy(folder / "data" / "cloze.jsonl", folder / "cloze_dir" / "test.jsonl")
    (folder / "mycloze.yaml").write_text(yaml.safe_dump({"include": "_base_yaml", "task": "my_cloze",
                                                         "dataset_path": "cloze_dir"}))
    task = ut.load_tasks(folder)["my_cloze"]
    assert task.config["dataset_path"] == str(folder / "cloze_dir") and task.config["output_type"] == "loglikelihood"
    result = evaluate(tiny_llama(), tiny_tokenizer(), EvalSpec(tasks=("my_cloze",), limit=3, include_path=str(folder)))
    assert result.score("my_cloze").n == 3


# ---------------------------------------------------------------------------- stock tasks need local data


@pytest.fixture
def mmlu_algebra_cached(tmp_path, monkeypatch):
    """A local datasets cache holding a prepared (tiny) cais/mmlu abstract_algebra, as a download leaves it."""
    import datasets

    rows = [{"question": f"What is {i} + {i}?", "subject": "abstract_algebra",
             "choices": [str(2 * i), str(i), str(i + 1), "0"], "answer": 0} for i in range(6)]
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "hf-datasets"
    builder = datasets.load_dataset_builder("json", data_files={"test": str(tmp_path / "mmlu.jsonl"),
                                                                "dev": str(tmp_path / "mmlu.jsonl")},
                                            cache_dir=str(cache / "build"))
    builder.download_and_prepare()
    dst = cache / "cais___mmlu" / "abstract_algebra" / "0.0.0" / "0123abcd"
    dst.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        shutil.copy(f, dst / f.name.replace("json-", "mmlu-"))
    info = json.loads((dst / "dataset_info.json").read_text())
    (dst / "dataset_info.json").write_text(json.dumps({**info, "config_name": "abstract_algebra"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return dst


def test_a_stock_task_runs_when_its_dataset_is_in_the_local_cache(mmlu_algebra_cached):
    from greenopt.evaluate.stock_tasks import check_offline

    assert check_offline("mmlu_abstract_algebra") == (str(mmlu_algebra_cached),)
    result = evaluate(tiny_llama(), tiny_tokenizer(), EvalSpec(tasks=("mmlu_abstract_algebra",), limit=3))
    assert result.score("mmlu_abstract_algebra").n == 3
    with pytest.raises(ConfigError, match=r"subtask mmlu_\w+\) needs the hub dataset cais/mmlu \((?!abstract)"):
        validate_tasks(["mmlu"])  # the group's other subjects are not cached
    with pytest.raises(ConfigError, match=r"^task 'winogrande' needs the hub dataset allenai/winogrande "
                                          r"\(winogrande_xl\), which is not in the local datasets cache .*hf-datasets"
                                          r"\); greenopt runs offline: use an offline task \(arc_easy, .*--include-path"):
        validate_tasks(["winogrande"])
