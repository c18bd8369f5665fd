"""Workers sharing one study on a real PostgreSQL server: no trial lost or duplicated.

The test starts a throwaway cluster (initdb + pg_ctl) in a temp folder on a free localhost
port and stops it afterwards. It is skipped when the PostgreSQL server binaries are absent.
As root, the server runs as the ``postgres`` system user (initdb refuses root).
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres

N_TRIALS = 12


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def _as_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no 'postgres' user to run the server as")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def pg_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    pytest.importorskip("psycopg2")
    prefix = _as_user()
    root = Path(tempfile.mkdtemp(prefix="greenopt-pg-"))
    data = root / "data"
    if prefix:
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(prefix + [initdb, "-D", str(data), "-U", "greenopt", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(prefix + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://greenopt@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _work(url: str, study: str, device: str, sleep_s: float, runs_dir: str) -> list[int]:
    import optuna

    from greenopt.search import worker
    from greenopt.testing.search import FakeRunner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recs = worker(url, study, runner=FakeRunner(device_name=device, sleep_s=sleep_s), runs_dir=runs_dir)
    return [r.number for r in recs]


def _prepare(url: str, name: str, tmp_path: Path, **kw):
    from greenopt.config import SearchSpec, SpaceSpec
    from greenopt.search import prepare_study

    spec = SearchSpec(target="C", n_trials=N_TRIALS, storage=url, study_name=name, runs_dir=str(tmp_path),
                      space=SpaceSpec(bits=(8, 4), layer_groups=2), seed=2, **kw)
    return prepare_study(spec, num_layers=12)


def _states(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_two_workers_share_one_study(pg_url, tmp_path):
    _prepare(pg_url, "two", tmp_path)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        a, b = pool.starmap(_work, [(pg_url, "two", "gpu0", 0.05, str(tmp_path / "w0")),
                                    (pg_url, "two", "gpu1", 0.05, str(tmp_path / "w1"))])
    assert a and b, "both workers should have run trials"
    assert not set(a) & set(b), "a trial ran on two workers"
    everything = _states(pg_url, "two")
    trials = [t for t in everything if not t.user_attrs.get("over_budget")]  # a slot two workers raced for
    assert all(t.state.name == "FAIL" and "record" not in t.user_attrs for t in everything if t not in trials)
    assert sorted(a + b) == sorted(t.number for t in trials) and len(trials) == N_TRIALS
    assert all(t.state.is_finished() and "record" in t.user_attrs for t in trials)
    devices = {t.number: t.user_attrs["device"] for t in trials}
    assert all(devices[n] == "gpu0" for n in a) and all(devices[n] == "gpu1" for n in b)
    assert sum(t.user_attrs.get("baseline", False) for t in trials) == 1


def test_a_dead_workers_trial_is_failed_by_heartbeat_and_replaced(pg_url, tmp_path):
    _prepare(pg_url, "dead", tmp_path, heartbeat_interval_s=1)
    ctx = mp.get_context("spawn")
    doomed = ctx.Process(target=_work, args=(pg_url, "dead", "gpu0", 120.0, str(tmp_path / "w0")))
    doomed.start()
    try:
        deadline = time.monotonic() + 60
        while not any(t.state.name == "RUNNING" for t in _states(pg_url, "dead")):
            assert time.monotonic() < deadline, "the first worker never started a trial"
            time.sleep(0.2)
        time.sleep(1.5)  # inside the trial, beating; the kill lands mid-trial, not between ask and beat
    finally:
        doomed.kill()  # kill -9: no chance to tell the study anything
        doomed.join()
    survivor = _work(pg_url, "dead", "gpu1", 0.5, str(tmp_path / "w1"))
    trials = _states(pg_url, "dead")
    lost = [t for t in trials if "record" not in t.user_attrs]
    assert len(lost) == 1 and lost[0].state.name == "FAIL"
    assert all(t.state.is_finished() for t in trials)
    assert len(survivor) == N_TRIALS and len(trials) == N_TRIALS + 1
