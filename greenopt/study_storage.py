"""Study storage for the search: RDB engines, crash recovery, and trial heartbeats.

Private sqlite studies resume by failing trials a dead process left RUNNING; shared RDB
storages (PostgreSQL) use Optuna heartbeats so the other workers fail a dead worker's trial.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

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
