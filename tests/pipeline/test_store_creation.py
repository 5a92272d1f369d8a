"""A new SQLite store survives its creator being killed at any moment, and a half-migrated one is repaired.

Real processes and the real MLflow store: one process opens a new store (as the first
job on an outputs folder does) and is SIGKILLed before, during and after the schema
migration; the next opener must record a run normally. A store left half-migrated by
MLflow's own in-place creation (what older versions of this code did) is recognised:
repaired, or moved aside with one line saying where.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import REPO, clean_env, wait_for

OPEN = """
import sys
from pipeline import tracking
settings = {"store": sys.argv[1], "artifacts": sys.argv[2], "experiment": "creation"}
client = tracking.make_client(settings)
experiment = tracking.open_experiment(client, settings)
run = client.create_run(experiment, run_name="after")
client.set_terminated(run.info.run_id, status="FINISHED")
print("recorded")
"""
# MLflow creating a store in place, as every opener did before stores were created under a temporary name.
IN_PLACE = "import sys; from mlflow.tracking import MlflowClient; MlflowClient(f'sqlite:///{sys.argv[1]}').search_experiments()"


def opener(db: Path, script: str = OPEN) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, str(db), str(db.parent / "art")], cwd=REPO,
                            env=clean_env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def staging(db: Path) -> list[Path]:
    return list(db.parent.glob(f".{db.name}.new-*"))


MOMENTS = {
    "before": lambda db: (db.parent / f".{db.name}.lock").exists(),
    "during": lambda db: any(p.stat().st_size > 0 for p in staging(db)),  # tables created, migrating
    "after": lambda db: db.exists(),
}


def assert_next_opener_records(db: Path) -> str:
    proc = opener(db)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "recorded" in out and "Traceback" not in out, out[-3000:]
    from testkit import mlflow_client, mlflow_runs

    runs = mlflow_runs(mlflow_client(uri=f"sqlite:///{db}"), "creation")
    assert [r.info.status for r in runs if r.info.run_name == "after"][-1:] == ["FINISHED"]
    return out


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_creator_killed_at_any_moment_leaves_no_broken_store(tmp_path, moment):
    db = tmp_path / "mlflow.db"
    first = opener(db)
    try:
        wait_for(lambda: MOMENTS[moment](db) or first.poll() is not None, timeout=300, what=f"the {moment} moment")
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(30)
    assert not db.exists() or db.stat().st_size > 0  # the store is whole or absent, never half made
    assert_next_opener_records(db)


def test_a_half_migrated_store_is_repaired_or_moved_aside_in_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    first = opener(db, IN_PLACE)
    try:  # killed while MLflow migrates the file in place
        wait_for(lambda: db.exists() and db.stat().st_size > 50_000 or first.poll() is not None, timeout=300,
                 what="the migration")
        time.sleep(0.3)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(30)
    out = assert_next_opener_records(db)
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    if first.returncode == 0:  # it finished before the kill: nothing to repair
        assert not warnings
        return
    (line,) = warnings
    assert str(db) in line and ("moved to" in line or "migrated and kept" in line)
    if "moved to" in line:
        assert list(tmp_path.glob("mlflow.db.broken-*"))
