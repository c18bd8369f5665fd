"""The search's study and its storage: checking and opening storage URLs, opening a study with
its seeded sampler, reading its trial records, crash recovery, and trial heartbeats.

Private sqlite studies resume by failing trials a dead process left RUNNING; shared RDB
storages (PostgreSQL) use Optuna heartbeats so the other workers fail a dead worker's trial.
A storage URL that cannot work (malformed, a driver not installed, a server not reachable, a
sqlite path in a missing folder) is a :class:`~greenopt.errors.ConfigError` naming the URL,
its password hidden, and the fix.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sa_exc

from greenopt.config import SearchSpec
from greenopt.errors import ConfigError
from greenopt.label import LabelScheme, load_scheme
from greenopt.records import Comparison, EvalResult, Grade, RungScore, TrialRecord

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

log = logging.getLogger(__name__)

_URL_FORMS = "write it as postgresql://USER:PASSWORD@HOST/DB or sqlite:///PATH/study.db"
_CONNECT_TIMEOUT_S = 15  # the check before the model loads must not hang on a silent host
_DRIVER_FIX = {
    "postgresql": "pip install psycopg2-binary, or name an installed driver (postgresql+psycopg2://...)",
    "mysql": "pip install pymysql and write mysql+pymysql://...",
}
_SQLITE_OPTION = re.compile(r"^[A-Za-z_]+=[^&]*(&[A-Za-z_]+=[^&]*)*$")


def storage_url(url: str) -> str:
    """The URL given to SQLAlchemy: ``postgresql://`` names psycopg2 when only psycopg2 is installed.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; the documented form must keep
    working where only ``psycopg2-binary`` is installed.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "postgresql" and not _importable("psycopg") and _importable("psycopg2"):
        return f"postgresql+psycopg2://{rest}"
    return url


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_storage(url: str) -> None:
    """Checks that ``url`` can hold a study, before anything slow (loading a model) starts.

    Parses the URL, imports its driver and opens one connection (a sqlite file: checks its
    folder, and opens the file when it exists). Writes nothing.

    Raises:
        ConfigError: the URL is malformed, its driver is not installed, the server is not
            reachable, or a sqlite path is unusable; the message names the redacted URL and the fix.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        path = _check_sqlite(url, parsed)
        if path is None or not path.is_file():
            return
    timeout = parsed.get_backend_name() in ("postgresql", "mysql", "mariadb")  # their drivers take connect_timeout
    engine = _engine(url, parsed, poolclass=sqlalchemy.pool.NullPool,
                     connect_args={"connect_timeout": _CONNECT_TIMEOUT_S} if timeout else {})
    try:
        with engine.connect() as conn:
            if parsed.get_backend_name() == "sqlite":
                conn.exec_driver_sql("PRAGMA schema_version")  # reads the header: "file is not a database"
    except sa_exc.SQLAlchemyError as e:
        raise _unreachable(url, e) from e
    finally:
        engine.dispose()


def open_storage(url: str, *, shared: bool, heartbeat_s: int) -> optuna.storages.BaseStorage:
    """The Optuna RDB storage at ``url`` (heartbeats on when ``shared``).

    Raises:
        ConfigError: as :func:`check_storage`.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite(url, parsed)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True}
    beats: dict[str, Any] = {"heartbeat_interval": heartbeat_s, "grace_period": 3 * heartbeat_s} if shared else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(storage_url(url), engine_kwargs=kwargs, **beats)
    except ImportError as e:
        raise _no_driver(url, e) from e
    except sa_exc.ArgumentError as e:
        raise _bad_url(url, e) from e
    except sa_exc.SQLAlchemyError as e:
        raise _unreachable(url, e) from e


def _parse(url: str) -> sqlalchemy.engine.URL:
    where = redact(url)
    if "{" in url or "}" in url:  # optuna formats the URL as a template (``{SCHEMA_VERSION}``)
        raise ConfigError(f"storage {where}: '{{' and '}}' are read by Optuna as a template; "
                          "write them as %7B and %7D, or rename the folder")
    try:
        parsed = sqlalchemy.engine.make_url(storage_url(url))
    except sa_exc.ArgumentError as e:
        raise _bad_url(url, e) from e
    _, sep, options = url.partition("?")
    if sep and parsed.get_backend_name() == "sqlite" and not _SQLITE_OPTION.match(options):
        raise ConfigError(f"storage {where}: the sqlite path holds '?', which starts the URL's options; "
                          "write it as %3F, or rename the folder")
    return parsed


def _check_sqlite(url: str, parsed: sqlalchemy.engine.URL) -> Path | None:
    """The sqlite file's path once its folder is known to exist (None: in memory or a URI)."""
    db = parsed.database
    if not db or db == ":memory:" or parsed.query.get("uri") or db.startswith("file:"):
        return None
    path, where = Path(db), redact(url)
    if path.is_dir():
        raise ConfigError(f"storage {where}: {path} is a folder, not a database file; name a file such as "
                          f"{path / 'study.db'}")
    folder = path.parent
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"storage {where}: cannot write in folder {folder} (permission denied); "
                              "choose a writable folder")
        return path
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"storage {where}: {blocker} is a file, not a folder; fix the path or move the file")
    raise ConfigError(f"storage {where}: folder {folder} does not exist; create it (mkdir -p {folder}) "
                      "or fix the path")


def _engine(url: str, parsed: sqlalchemy.engine.URL, **kwargs: Any) -> sqlalchemy.engine.Engine:
    try:
        return sqlalchemy.create_engine(parsed, **kwargs)
    except ImportError as e:
        raise _no_driver(url, e) from e
    except sa_exc.ArgumentError as e:
        raise _bad_url(url, e) from e


def _bad_url(url: str, e: Exception) -> ConfigError:
    if isinstance(e, sa_exc.NoSuchModuleError):
        kind = url.partition("://")[0] or url
        return ConfigError(f"storage {redact(url)}: unknown database kind {kind!r}; {_URL_FORMS}")
    return ConfigError(f"storage {redact(url)} is not a database URL ({_first_line(url, e)}); {_URL_FORMS}")


def _no_driver(url: str, e: ImportError) -> ConfigError:
    cause = e.__cause__ if isinstance(e.__cause__, ImportError) else e
    kind = url.partition("://")[0].partition("+")[0]
    fix = _DRIVER_FIX.get(kind, "install the SQLAlchemy driver it names")
    return ConfigError(f"storage {redact(url)}: its database driver is not installed "
                       f"({_first_line(url, cause)}); {fix}")


def _unreachable(url: str, e: Exception) -> ConfigError:
    what = _first_line(url, getattr(e, "orig", None) or e)
    if url.startswith("sqlite"):
        return ConfigError(f"storage {redact(url)}: cannot open the sqlite database ({what}); check that the "
                           "path names a sqlite file in a writable folder")
    return ConfigError(f"storage {redact(url)}: cannot connect ({what}); check that the server is running and "
                       "reachable from here, and that the user, password and database exist")


def _first_line(url: str, e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].strip()
    try:
        password = sqlalchemy.engine.make_url(url).password
    except sa_exc.ArgumentError:
        password = None
    return text.replace(str(password), "***") if password else text


def redact(url: str) -> str:
    """``url`` with its credentials replaced by ``***`` (sqlite paths are kept as they are)."""
    if url.startswith("sqlite"):
        return url
    head, sep, tail = url.rpartition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"


def recover(study: optuna.Study, *, shared: bool,
            lost: Callable[[FrozenTrial], TrialRecord | None] | None = None) -> list[TrialRecord]:
    """Marks trials left RUNNING by a dead process as FAIL (all of them for a private study).

    ``lost(trial)`` gives the record to store for such a trial (state FAIL, ``lost``), or
    None when it has none; the records are returned, so the caller can rewrite their files.
    """
    if shared:
        fail_stale(study)
        return []
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("trial %d was left running by a stopped process; marking it failed (lost)", t.number)
        rec = lost(t) if lost is not None else None
        storage = study._storage  # a RUNNING trial's attrs are set through its storage (no public handle)
        storage.set_trial_user_attr(t._trial_id, "lost", True)
        if rec is not None:
            storage.set_trial_user_attr(t._trial_id, "record", rec.model_dump(mode="json"))
            out.append(rec)
        study.tell(t.number, state=TrialState.FAIL)
    return out


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

    def __enter__(self) -> Self:
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
    """The TrialRecords stored in a study, by trial number (trials lost to a crash have none),
    with the confirmation of each confirmed trial merged in (:func:`save_confirmation`)."""
    attrs = study.user_attrs
    out = []
    for t in study.get_trials(deepcopy=False):
        if "record" not in t.user_attrs:
            continue
        rec = TrialRecord.model_validate(t.user_attrs["record"])
        conf = attrs.get(f"{CONFIRMED_ATTR}.{rec.number}")
        if conf is not None:
            rec = rec.model_copy(update={"confirmed": Comparison.model_validate(conf["comparison"]),
                                         "confirmed_grade": Grade.model_validate(conf["grade"])})
        final = attrs.get(f"{FINAL_ATTR}.{rec.number}")
        if final is not None:
            rec = rec.model_copy(update={"final": RungScore.model_validate(final["score"]),
                                         "final_eval": EvalResult.model_validate(final["eval"])})
        out.append(rec)
    return sorted(out, key=lambda r: r.number)


CONFIRMED_ATTR = "greenopt.confirmed"


def save_confirmation(study: optuna.Study, number: int, comparison: Comparison, grade: Grade) -> None:
    """Stores trial ``number``'s confirmed figures as a study attribute (a finished trial's own
    attributes cannot change); :func:`records` merges them into the trial's record."""
    study.set_user_attr(f"{CONFIRMED_ATTR}.{number}", {"comparison": comparison.model_dump(mode="json"),
                                                       "grade": grade.model_dump(mode="json")})


FINAL_ATTR = "greenopt.final"


def save_final(study: optuna.Study, number: int, score: RungScore, result: EvalResult) -> None:
    """Stores trial ``number``'s finalist scoring (accuracy on the final item set, per item) as a
    study attribute; :func:`records` merges it into the trial's record."""
    study.set_user_attr(f"{FINAL_ATTR}.{number}", {"score": score.model_dump(mode="json"),
                                                   "eval": result.model_dump(mode="json")})


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


def _counts(t: optuna.trial.FrozenTrial) -> bool:
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or (
        t.state == TrialState.FAIL and "record" in t.user_attrs and not t.user_attrs.get("lost"))


def budget_left(study: optuna.Study, n_trials: int) -> int:
    return n_trials - sum(_counts(t) for t in study.get_trials(deepcopy=False))


def over_budget(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """True (and the trial is told FAIL, marked lost and ``over_budget``) when workers that checked
    the budget at the same moment asked for more trials than it had left: the trials beyond the
    budget in number order give their slot back before running, so exactly ``n_trials`` run."""
    counted = sorted(t.number for t in study.get_trials(deepcopy=False) if _counts(t))
    if trial.number not in counted[n_trials:]:
        return False
    trial.set_user_attr("lost", True)
    trial.set_user_attr("over_budget", True)
    study.tell(trial, state=TrialState.FAIL)
    log.info("trial %d is over the budget of %d (another worker took the last slot); not run", trial.number,
             n_trials)
    return True
