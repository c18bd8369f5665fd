"""The search: an Optuna multi-objective study over compression variants.

Public verbs: :func:`search` (a whole run in one process), :func:`worker` (one more process
on a shared RDB study), :func:`prepare_study` (create a shared study for workers) and
:func:`to_json`. The rooms: ``space`` (variants from trial parameters), ``runner`` (apply,
quick look, evaluate, measure one variant), ``pareto`` (front, selection, the unreachable
report), ``storage`` (the study, its sampler and storage), ``rundir`` (``runs/NAME/``) and the
private ``_loop`` that drives the trials.

Example:
    >>> from greenopt.config import SearchSpec
    >>> from greenopt.search import search
    >>> from greenopt.testing.search import FakeRunner
    >>> result = search(SearchSpec(target="C", n_trials=8, runs_dir=str(tmp)),
    ...                 runner=FakeRunner())                    # doctest: +SKIP
"""

from greenopt.records import SearchResult
from greenopt.search._loop import prepare_study, search, to_json, worker
from greenopt.search.storage import records

__all__ = ["SearchResult", "prepare_study", "records", "search", "to_json", "worker"]
