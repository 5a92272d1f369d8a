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
    # The newest "after" run is this opener's: a creator killed "after" may have opened one of its own
    # first (left RUNNING), and the store lists runs newest first.
    after = sorted((r for r in runs if r.info.run_name == "after"), key=lambda r: r.info.start_time)
    assert after and after[-1].info.status == "FINISHED", [(r.info.start_time, r.info.status) for r in after]
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


# A whole store made in place, one run in it, then its schema version put back to before the migration
# that creates evaluation_datasets: what a creator killed after that migration's DDL but before alembic
# recorded it leaves (every later opener failed on "table evaluation_datasets already exists").
HALF_MIGRATED = """
import sqlite3, sys
from pathlib import Path
from alembic.script import ScriptDirectory
from mlflow.store.db.utils import _get_alembic_config
from mlflow.tracking import MlflowClient
client = MlflowClient(f"sqlite:///{sys.argv[1]}")
client.create_run(client.create_experiment("creation")).info.run_id
script = ScriptDirectory.from_config(_get_alembic_config(db_url=""))
(rev,) = [r for r in script.walk_revisions() if Path(r.path).name.endswith("_add_evaluation_datasets.py")]
with sqlite3.connect(sys.argv[1]) as conn:
    conn.execute("update alembic_version set version_num = ?", (rev.down_revision,))
"""


def test_a_half_migrated_store_is_moved_aside_in_one_line_and_a_new_one_records(tmp_path):
    db = tmp_path / "mlflow.db"
    maker = opener(db, HALF_MIGRATED)
    assert maker.wait(300) == 0, maker.stdout.read()
    out = assert_next_opener_records(db)
    (line,) = [x for x in out.splitlines() if x.startswith("warning:")]
    (aside,) = tmp_path.glob("mlflow.db.broken-*")
    assert f"moved to {aside}" in line and "it holds 1 run(s)" in line and "pipeline.tracking sync" in line
    assert "already exists" in line or "out-of-date" in line
