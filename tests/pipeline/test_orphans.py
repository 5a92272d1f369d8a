"""Jobs and sweeps killed outright (SIGKILL) are closed by the next job on their outputs folder.

With tracking off the run folder is the only record: the next job marks its run.json
FAILED all the same. A sweep whose launcher is SIGKILLed leaves a parent run that only
its process could close; it carries that process's identity, so the next job that opens
the store closes it FAILED. The next job here is a cheap one that is refused at its
checks (validate.iterations=0): tidying happens whatever the job then does.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from testkit import REPO, clean_env, mlflow_client, mlflow_runs, overrides, wait_for

SLOW = ("model._target_=testkit.slow_tiny", "+model.kwargs.seconds=300")


def launch(tmp: Path, *extra: str, multirun: bool = False) -> subprocess.Popen:
    where = f"hydra.sweep.dir={tmp}/sweep" if multirun else f"hydra.run.dir={tmp}/run"
    cmd = [sys.executable, "-m", "pipeline", *(["-m"] if multirun else []),
           *overrides(tmp, ("experiment=smoke", *extra), tmp / "cache"), where]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1"),
                            stdout=open(tmp / f"{'sweep' if multirun else 'job'}.log", "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)


def next_job(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """A job on the same outputs folder, refused at its checks after tidying up."""
    cmd = [sys.executable, "-m", "pipeline", *overrides(tmp, ("experiment=smoke", "validate.iterations=0", *extra),
                                                         tmp / "cache"), f"hydra.run.dir={tmp}/next"]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


def record(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_a_killed_untracked_job_is_closed_by_the_next_untracked_job(tmp_path):
    job = launch(tmp_path, *SLOW, "tracking.enabled=false")
    wait_for(lambda: record(tmp_path / "run").get("process") and (tmp_path / "run" / "config.yaml").exists(),
             timeout=300, what="the job's run.json")
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(30)
    assert record(tmp_path / "run")["status"] == "RUNNING"
    later = next_job(tmp_path, "tracking.enabled=false")
    assert later.returncode == 2, later.stdout + later.stderr
    closed = record(tmp_path / "run")
    assert closed["status"] == "FAILED" and "ended without closing the run" in closed["error"]


def parent_run(tmp: Path):
    if not (tmp / "mlflow.db").exists():
        return None
    with open(tmp / ".mlflow.db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = mlflow_runs(mlflow_client(tmp))
    return next((r for r in runs if r.data.tags.get("sweep.role") == "parent"), None)


def test_a_sigkilled_sweep_launcher_leaves_a_parent_the_next_job_closes(tmp_path):
    sweep = launch(tmp_path, *SLOW, "compile.min_block_size=1,2", multirun=True)
    wait_for(lambda: parent_run(tmp_path) and record(tmp_path / "sweep" / "0").get("process"), timeout=300,
             what="the sweep's parent and first job")
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait(30)
    assert parent_run(tmp_path).info.status == "RUNNING"
    later = next_job(tmp_path)
    assert later.returncode == 2, later.stdout + later.stderr
    parent = parent_run(tmp_path)
    assert parent.info.status == "FAILED" and "ended without closing the run" in parent.data.tags["error"]
    assert record(tmp_path / "sweep" / "0")["status"] == "FAILED"
