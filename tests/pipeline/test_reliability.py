"""Every run ends recorded: signals, crashes in native code, dead processes, stores that are down.

Real processes throughout: `python -m pipeline` jobs signalled with SIGTERM and SIGKILL,
a forward that segfaults through ctypes, two processes racing to create a new SQLite
store, and a real `mlflow server` stopped in the middle of a job and started again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import (
    REPO,
    STAGES,
    clean_env,
    cli_command,
    free_port,
    half_written,
    mlflow_client,
    mlflow_runs,
    start_server,
    stop,
    wait_for,
)

SLOW = ("model._target_=testkit.slow_tiny", "+model.kwargs.seconds=120")


def env(**extra: str) -> dict[str, str]:
    return clean_env(PYTHONPATH=str(REPO / "tests"), **extra)


def start(tmp: Path, *extra: str, **env_extra: str) -> subprocess.Popen:
    out = open(tmp / "job.log", "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(cli_command(tmp, *extra, cache=tmp / "cache"), cwd=REPO, env=env(**env_extra),
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def run(tmp: Path, *extra: str, timeout: float = 300, cache: Path | None = None,
        **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(tmp, *extra, cache=cache or tmp / "cache"), cwd=REPO, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def run_json(tmp: Path) -> dict:
    return json.loads((tmp / "run" / "run.json").read_text())


def running_run(tmp: Path):
    """The job's MLflow run once it is open and RUNNING (and its stage worker is at work).

    Read under the lock the job creates the store with, so this reader never migrates a
    store the job is still creating.
    """
    import fcntl

    if not (tmp / "mlflow.db").exists():
        return None
    with open(tmp / ".mlflow.db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            runs = mlflow_runs(mlflow_client(tmp))
        except Exception:  # the store is still being created
            return None
    return next((r for r in runs if r.info.status == "RUNNING" and r.data.params), None)


def test_sigterm_mid_build_is_recorded_killed(tmp_path):
    proc = start(tmp_path, *SLOW)
    wait_for(lambda: running_run(tmp_path), what="the job's MLflow run")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    output = (tmp_path / "job.log").read_text()
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert len(error_lines(output)) == 1 and "interrupted by SIGTERM" in output and "Traceback" not in output
    record = run_json(tmp_path)
    assert record["status"] == "KILLED" and "SIGTERM" in record["error"]
    (mlrun,) = mlflow_runs(mlflow_client(tmp_path))
    assert mlrun.info.status == "KILLED"
    assert half_written(tmp_path / "cache") == [] and not list((tmp_path / "run").glob(".*.tmp"))


def test_a_sigkilled_run_is_closed_failed_by_the_next_job(tmp_path):
    proc = start(tmp_path, *SLOW)
    dead = wait_for(lambda: running_run(tmp_path), what="the job's MLflow run")
    assert dead.data.tags["pipeline.pid"] == str(proc.pid) and dead.data.tags["pipeline.host"] == socket.gethostname()
    assert run_json(tmp_path)["status"] == "RUNNING"  # run.json exists from before the first stage
    proc.kill()
    proc.wait(30)
    (tmp_path / "next").mkdir()
    later = run(tmp_path / "next", f"tracking.store={tmp_path}/mlflow.db", f"tracking.artifacts={tmp_path}/mlartifacts")
    assert later.returncode == 0, later.stdout + later.stderr
    runs = {r.info.run_id: r for r in mlflow_runs(mlflow_client(tmp_path))}
    closed = runs[dead.info.run_id]
    assert closed.info.status == "FAILED" and "ended without closing the run" in closed.data.tags["error"]
    assert run_json(tmp_path)["status"] == "FAILED"
    assert sum(r.info.status == "FINISHED" for r in runs.values()) == 1


def test_a_segfault_in_a_stage_is_one_line_and_a_failed_run(tmp_path):
    proc = run(tmp_path, "model._target_=testkit.segfault_net")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-3000:]
    (line,) = error_lines(output)
    # The model is first built by the memory check, in the stage worker, before export: the crash is named there.
    assert re.search(r"stage (memory check|export) crashed", line) and "SIGSEGV" in line and "Traceback" not in output
    assert run_json(tmp_path)["status"] == "FAILED"
    (mlrun,) = mlflow_runs(mlflow_client(tmp_path))
    assert mlrun.info.status == "FAILED" and "SIGSEGV" in mlrun.data.tags["error"]
    assert half_written(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / "export").exists() or not any(
        p for p in (tmp_path / "cache" / "export").iterdir() if not p.name.startswith("."))


def test_a_crashing_job_does_not_stop_its_sweep(tmp_path):
    cmd = [sys.executable, "-m", "pipeline", "-m", "model=tiny_cnn", "input=image_64", "validate=quick",
           "target=onnxruntime", "model._target_=testkit.segfault_net", "+model.kwargs.crash=true,false",
           "model.task=regression", f"paths.outputs={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "2 jobs, 1 failed" in output and "SIGSEGV" in output
    statuses = sorted(r.info.status for r in mlflow_runs(mlflow_client(tmp_path))
                      if r.data.tags.get("sweep.role") != "parent")
    assert statuses == ["FAILED", "FINISHED"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs, nearly full: where the cache runs out of space mid-stage."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        (mount / "filler").write_bytes(b"\0" * (free - 48 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_naming_it(tmp_path, tiny_disk):
    proc = run(tmp_path, cache=tiny_disk / "cache")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-3000:]
    (line,) = error_lines(output)
    assert "stage export" in line and f"the disk holding {tiny_disk}" in line and "MB free" in line
    assert "Traceback" not in output
    assert run_json(tmp_path)["status"] == "FAILED"
    assert half_written(tiny_disk / "cache") == []


RACE = r"""
import sys
from pipeline import tracking
settings = {"store": sys.argv[1], "artifacts": sys.argv[2], "experiment": "race", "enabled": True,
            "log_artifacts": False}
client = tracking.make_client(settings)
experiment = tracking.open_experiment(client, settings)
run = client.create_run(experiment, run_name=sys.argv[3])
client.set_terminated(run.info.run_id, status="FINISHED")
"""


@pytest.mark.parametrize("attempt", range(5))
def test_two_processes_creating_a_new_sqlite_store_both_succeed(tmp_path, attempt):
    db, artifacts = tmp_path / "mlflow.db", tmp_path / "art"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(db), str(artifacts), f"job{i}"], cwd=REPO,
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = mlflow_runs(mlflow_client(tmp_path), "race")
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1"]


def test_an_unreachable_tracking_server_fails_before_any_stage(tmp_path):
    """The preflight's refusal comes before the run folder's files, the stage worker's work and the cache."""
    port = free_port()
    proc = run(tmp_path, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    (line,) = error_lines(output)
    assert f"the MLflow server at http://127.0.0.1:{port} does not answer" in line, line
    assert "tracking.enabled=false" in line and "Traceback" not in output
    assert not (tmp_path / "cache").exists()  # nothing was built
    record = run_json(tmp_path)  # the job is on record from its first moment: failed, with the same line
    assert record["status"] == "FAILED" and record["error"] in line and not record["metrics"]
    assert [stage for stage in STAGES if (tmp_path / "run" / stage).exists()] == []


def test_the_preflight_gives_up_on_a_silent_server_after_its_own_timeout(monkeypatch):
    """A port that accepts connections and never answers: the wait is bounded by PREFLIGHT_SECONDS.

    The socket's timeout is read as the connection is made (its value, not the time taken):
    without one a silent server would hold the job before its first stage for ever.
    """
    from pipeline.tracking import recovery

    timeouts = []
    connect = socket.create_connection

    def recording(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, *args, **kwargs):
        timeouts.append(timeout)
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    monkeypatch.setattr(recovery, "PREFLIGHT_SECONDS", 0.5)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(120)  # a preflight without a timeout of its own fails below instead of hanging
    try:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(1)  # the kernel completes the handshake; nothing ever reads or answers
            url = f"http://127.0.0.1:{silent.getsockname()[1]}"
            with pytest.raises(recovery.StoreUnavailable) as err:
                recovery.preflight(url)
    finally:
        socket.setdefaulttimeout(previous)
    assert timeouts == [0.5]
    assert f"the MLflow server at {url} does not answer (timed out)" in err.value.one_line()


def test_an_unwritable_sqlite_store_fails_before_any_stage(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    proc = run(tmp_path, f"tracking.store={tmp_path}/a_file/mlflow.db")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    (line,) = error_lines(output)
    assert "cannot be written" in line and not (tmp_path / "cache").exists()


def server_and_slow_job(tmp_path: Path):
    """A real mlflow server on a free port, and a job tracking to it that builds until tmp_path/go exists."""
    port, root = free_port(), tmp_path / "server"
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(port, root)
    job = start(tmp_path, "model._target_=testkit.slow_tiny", "+model.kwargs.seconds=600",
                f"+model.kwargs.until={tmp_path / 'go'}", MLFLOW_TRACKING_URI=uri)
    return port, root, uri, server, job


def test_a_server_lost_mid_run_loses_nothing_and_sync_sends_it(tmp_path):
    port, root, uri, server, job = server_and_slow_job(tmp_path)
    try:
        client = mlflow_client(uri=uri)
        # Open, with its params logged (the last thing opening does): the store is lost mid-run.
        wait_for(lambda: any(r.info.status == "RUNNING" and r.data.params for r in mlflow_runs(client)),
                 what="the job's run")
        stop(server)
        (tmp_path / "go").touch()  # the job builds on, and finds the store gone when it records
        assert job.wait(300) == 4
        output = (tmp_path / "job.log").read_text()
        (line,) = error_lines(output)
        assert "pipeline.tracking sync" in line and "Traceback" not in output
        record = run_json(tmp_path)
        assert record["status"] == "FINISHED" and record["tracking"]["recorded"] is False
        assert record["metrics"]["latency_p50_ms"] > 0  # the results are on disk
        server = start_server(port, root)
        sync = subprocess.run([sys.executable, "-m", "pipeline.tracking", "sync", str(tmp_path / "run")], cwd=REPO,
                              env=clean_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=120)
        assert sync.returncode == 0, sync.stdout + sync.stderr
        (mlrun,) = mlflow_runs(mlflow_client(uri=uri))
        assert mlrun.info.run_id == record["tracking"]["run_id"]  # the job's own run, now closed
        assert mlrun.info.status == "FINISHED" and mlrun.data.metrics["latency_p50_ms"] > 0
        assert run_json(tmp_path)["tracking"]["recorded"] is True
    finally:
        stop(server)
        job.kill()


def test_a_store_lost_while_the_run_opens_still_keeps_the_results(tmp_path):
    """The server answers the preflight, then is gone before the run is open: exit 4, sync later."""
    _, _, _, server, job = server_and_slow_job(tmp_path)
    try:
        # run.json is there from the job's first moment; config.yaml is written after the preflight.
        wait_for(lambda: (tmp_path / "run" / "config.yaml").is_file(), what="the job's config.yaml")
        stop(server)  # right after the preflight: opening the run fails in the background
        (tmp_path / "go").touch()
        assert job.wait(300) == 4
        record = run_json(tmp_path)
        assert record["status"] == "FINISHED" and record["tracking"]["recorded"] is False
        assert "pipeline.tracking sync" in record["tracking"]["error"]
    finally:
        stop(server)
        job.kill()
