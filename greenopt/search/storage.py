"""The search's study and its storage: opening a study with its seeded sampler, reading its
trial records, RDB engines, crash recovery, and trial heartbeats.

Private sqlite studies resume by failing trials a dead process left RUNNING; shared RDB
storages (PostgreSQL) use Optuna heartbeats so the other workers fail a dead worker's trial.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from greenopt.config import SearchSpec
from greenopt.errors import ConfigError
from greenopt.label import LabelScheme, load_scheme
from greenopt.records import TrialRecord

log = logging.getLogger(__name__)


def open_storage(url: str, *, shared: bool, heartbeat_s: int) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite"):
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True}
    if shared:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                              grace_period=3 * heartbeat_s)
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def redact(url: str) -> str:
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"


def recover(study: optuna.Study, *, shared: bool) -> None:
    """Marks trials left RUNNING by a dead process as FAIL (all of them for a private study)."""
    if shared:
        fail_stale(study)
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("trial %d was left running by a stopped process; marking it failed (lost)", t.number)
        study.tell(t.number, state=TrialState.FAIL)


def fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def beat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Records one heartbeat for ``trial`` now (RDB storages with heartbeats only)."""
    record = getattr(study._storage, "record_heartbeat", None)
    if record is not None and study._storage.get_heartbeat_interval():
        record(trial._trial_id)


class Heartbeat:
    """Records the trial's heartbeat every ``interval_s`` in a thread (RDB storages only)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval_s: int | None) -> None:
        storage = study._storage  # optuna keeps no public handle; record_heartbeat is public on it
        self._beat = getattr(storage, "record_heartbeat", None) if interval_s else None
        self._id, self._interval = trial._trial_id, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        if self._beat is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self._beat(self._id)
            except Exception as e:  # noqa: BLE001 - a missed beat must not kill the trial
                log.warning("heartbeat failed: %s", e)
            if self._stop.wait(self._interval):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


SPEC_ATTR = "greenopt.search_spec"


def open_study(spec: SearchSpec, storage_url: str, *, create: bool, resume: bool = True) -> optuna.Study:
    """Creates or loads the study of ``spec`` (two directions; the spec stored as a study attr).

    Raises:
        ConfigError: ``create`` without ``resume`` on a study that already has trials in
            shared storage.
    """
    shared = spec.storage is not None
    storage = open_storage(storage_url, shared=shared, heartbeat_s=spec.heartbeat_interval_s)
    name = spec.resolved_study_name
    if create:
        study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"],
                                    load_if_exists=True)
        if not resume and shared and study.get_trials(deepcopy=False):
            where = redact(storage_url)
            raise ConfigError(f"study {name!r} already has trials in {where}; pass --resume "
                              "to continue it or choose another --name")
        study.set_user_attr(SPEC_ATTR, spec.model_dump(mode="json"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["mean accuracy", "EEI" if load_scheme(spec.scheme).relative else "J/token"])
    else:
        study = optuna.load_study(study_name=name, storage=storage)
    # A resumed study must not replay its first session's random stream; workers differ by pid.
    offset = len(study.get_trials(deepcopy=False)) + (os.getpid() if shared else 0)
    study.sampler = make_sampler(spec, seed_offset=offset)
    return study


def make_sampler(spec: SearchSpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The seeded sampler of ``spec``.

    ``tpe`` (the default) is multivariate TPE with 10 random start-up trials; ``nsga2``
    uses a small population (``spec.resolved_population_size``) so a short budget still
    sees several generations. The target class and accuracy budget reach both as trial
    constraints (``Trial.set_constraint``). ``seed_offset`` (trials already in the study)
    keeps a resumed search from replaying the random stream of its first session.
    """
    seed = spec.seed + seed_offset
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=spec.resolved_population_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)


def records(study: optuna.Study) -> list[TrialRecord]:
    """The TrialRecords stored in a study, by trial number (trials lost to a crash have none)."""
    out = [TrialRecord.model_validate(t.user_attrs["record"])
           for t in study.get_trials(deepcopy=False) if "record" in t.user_attrs]
    return sorted(out, key=lambda r: r.number)


def objective_names(scheme: LabelScheme) -> tuple[str, str]:
    return ("maximize mean accuracy", "minimize EEI" if scheme.relative else "minimize J/token")


def cached(study: optuna.Study, variant_hash: str, device: str, number: int) -> TrialRecord | None:
    """The earliest COMPLETE or PRUNED record of the same variant on the same device."""
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                    key=lambda t: t.number):
        a = t.user_attrs
        if t.number != number and a.get("variant_hash") == variant_hash and a.get("device") == device \
                and "record" in a:
            return TrialRecord.model_validate(a["record"])
    return None


def budget_left(study: optuna.Study, n_trials: int) -> int:
    used = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            used += 1
        elif t.state == TrialState.FAIL and "record" in t.user_attrs and not t.user_attrs.get("lost"):
            used += 1
    return n_trials - used
