"""A sweep whose MLflow store goes away halfway, and a tracking URI that is not MLflow at all.

Real stores throughout: the sweep's SQLite file deleted, its folder made immutable
(chattr +i: even root cannot create SQLite's journal there), a real `mlflow server` on
127.0.0.1 killed; and a real HTTP server that answers 404 to everything. The sweep must
say so (exit non-zero, the summary table, no traceback), and one `sync` of the sweep
folder once the store is back must leave every run closed with its metrics.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from testkit import (
    REPO,
    clean_env,
    free_port,
    mlflow_client,
    mlflow_runs,
    overrides,
    start_server,
    stop,
    wait_for,
)


def start_sweep(tmp: Path, seconds: int, uri: str | None) -> subprocess.Popen:
    """job 0 quick, job 1 sleeping `seconds` in its factory (mid-export while the store is taken away)."""
    extra = ("experiment=smoke", "model._target_=testkit.slow_tiny", f"+model.kwargs.seconds=0,{seconds}",
             f"tracking.store={tmp}/store/mlflow.db")
    cmd = [sys.executable, "-m", "pipeline", "-m", *overrides(tmp, extra, tmp / "cache"), f"hydra.sweep.dir={tmp}/sweep"]
    env = clean_env(PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1", **({"MLFLOW_TRACKING_URI": uri} if uri else {}))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(tmp / "sweep.log", "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, text=True)


def runs_of(tmp: Path, uri: str | None) -> list:
    """The store's runs, read under the lock the sweep creates a SQLite store with (never mid-creation)."""
    if uri:
        return mlflow_runs(mlflow_client(uri=uri))
    if not (tmp / "store" / "mlflow.db").exists():
        return []
    with open(tmp / "store" / ".mlflow.db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return mlflow_runs(mlflow_client(uri=f"sqlite:///{tmp}/store/mlflow.db"))


READ = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name("pipeline")
print(json.dumps([{"run_id": r.info.run_id, "status": r.info.status, "tags": r.data.tags, "metrics": r.data.metrics}
                  for r in client.search_runs([exp.experiment_id])]))
"""


def fresh_runs(uri: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", READ, uri], capture_output=True, text=True, timeout=300,
                          env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job1_open(tmp: Path, uri: str | None) -> bool:
    return any(r.data.tags.get("sweep.job") == "1" and r.info.status == "RUNNING" and r.data.params
               for r in runs_of(tmp, uri))


def make_immutable(folder: Path) -> None:
    proc = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    probe = folder / "probe"
    try:
        probe.write_text("")
    except OSError:
        return
    probe.unlink()
    pytest.skip(f"cannot make a folder unwritable here (chattr: {proc.stderr.strip() or proc.returncode})")


@pytest.mark.parametrize("loss", ["deleted", "immutable", "server killed"])
def test_a_sweep_that_loses_its_store_says_so_and_one_sync_sends_everything(tmp_path, loss):
    uri = server = None
    if loss == "server killed":
        port, root = free_port(), tmp_path / "server"
        root.mkdir()
        uri, server = f"http://127.0.0.1:{port}", start_server(port, root)
    (tmp_path / "store").mkdir()
    sweep = start_sweep(tmp_path, 20, uri)
    try:
        wait_for(lambda: job1_open(tmp_path, uri), timeout=400, what="job 1's MLflow run")
        if loss == "deleted":
            (tmp_path / "store" / "mlflow.db").unlink()
        elif loss == "immutable":
            make_immutable(tmp_path / "store")
        else:
            stop(server)
        returncode = sweep.wait(600)
        out = (tmp_path / "sweep.log").read_text()
        assert returncode == 4, out[-3000:]  # no job failed; results are missing from MLflow
        assert "Traceback" not in out and "2 jobs, 0 failed" in out  # the summary table, from the run folders
        (line,) = [x for x in out.splitlines() if "pipeline.tracking sync" in x and "does not have" in x]
        assert f"python -m pipeline.tracking sync {tmp_path}/sweep" in line and "job(s) 1" in line
        subprocess.run(["chattr", "-i", str(tmp_path / "store")], capture_output=True)  # the store is back
        if server is not None:
            server = start_server(port, root)
        sync = subprocess.run([sys.executable, "-m", "pipeline.tracking", "sync", str(tmp_path / "sweep")],
                              cwd=REPO, env=clean_env(**({"MLFLOW_TRACKING_URI": uri} if uri else {})),
                              capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0 and "Traceback" not in sync.stderr, sync.stdout + sync.stderr
        # Read from a fresh process: this one's MLflow keeps connections to the file that was deleted.
        sweep_id = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["id"]
        mine = [r for r in fresh_runs(uri or f"sqlite:///{tmp_path}/store/mlflow.db") if r["tags"].get("sweep.id") == sweep_id]
        parents = [r for r in mine if r["tags"].get("sweep.role") == "parent"]
        children = sorted((r for r in mine if r["tags"].get("sweep.role") != "parent"), key=lambda r: r["tags"]["sweep.job"])
        assert len(parents) == 1 and parents[0]["status"] == "FINISHED", mine
        assert [c["status"] for c in children] == ["FINISHED", "FINISHED"]
        assert all(c["metrics"]["latency_p50_ms"] > 0 for c in children)
        assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parents[0]["run_id"]}
        assert parents[0]["metrics"]["jobs_total"] == 2
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "store")], capture_output=True)
        sweep.kill()
        if server is not None:
            stop(server)


class NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802  (http.server's name)
        self.send_error(404)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_tracking_uri_that_is_not_mlflow_is_refused_before_any_stage(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cmd = [sys.executable, "-m", "pipeline", *overrides(tmp_path, ("experiment=smoke",), tmp_path / "cache"),
               f"hydra.run.dir={tmp_path}/run"]
        proc = subprocess.run(cmd, cwd=REPO, env=clean_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                              timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("error:")]
    assert "is not an MLflow tracking server" in line and "HTTP 404" in line
    assert "Traceback" not in out and "done export" not in out
    assert not (tmp_path / "cache").exists()  # no stage ran
