"""Sweeps beyond one machine, run for real: SLURM (submitit) and Ray launchers, one MLflow server on PostgreSQL.

The session starts, from Debian's packages and as root, a PostgreSQL cluster with an MLflow
server (basic-auth on) over it, a one-node SLURM cluster (slurmctld, slurmd, slurmdbd on
MariaDB, munge) and a local Ray cluster (tests/cluster_services.py); every daemon is stopped
at the end. The same 4-job sweep `experiment=smoke compile.min_block_size=1,2,3,4` runs
under the basic launcher, through real sbatch/slurmd and through Ray, all logging to the
server as a user who is not its admin; the children, statuses, metrics and cache hits must
match. A job cancelled with scancel mid-build is a failed row, leaves no half-written cache
entry, and the sweep exits 1 with its summary. Skipped (with the reason) where the machine
cannot run them: not root, not Debian, a package that will not install, an extra missing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cluster_services as cs
import pytest
from testkit import REPO, clean_env, half_written

EXTRAS = {"hydra_plugins.hydra_submitit_launcher": "slurm", "hydra_plugins.hydra_ray_launcher": "ray",
          "psycopg2": "server", "flask_wtf": "server"}
MISSING = sorted({extra for module, extra in EXTRAS.items() if importlib.util.find_spec(module) is None})
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs pip install -e '.[{','.join(MISSING)}]'")

SWEEP = ("experiment=smoke", "compile.min_block_size=1,2,3,4")
STAGES = ("export", "lower", "partition", "convert", "build", "validate")


@pytest.mark.parametrize("launcher, expected", [
    ("submitit_slurm", {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}),
    ("submitit_local", {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"}),
    ("ray", {"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher", "ray.init.address": None}),
    ("slurm", {"partition": None, "gpus_per_task": None, "timeout_min": 60, "max_num_timeout": 0}),
    ("slurm_gpu", {"partition": "gpu", "gpus_per_task": 1, "timeout_min": 60}),
    ("ray_cluster", {"ray.init.address": "10.0.0.1:6379", "ray.init.object_store_memory": None,
                     "ray.remote.max_retries": 0, "ray.remote.num_gpus": 0,
                     "ray.init.runtime_env.env_vars.MLFLOW_TRACKING_USERNAME": "alice"}),
    ("ray_cluster_gpu", {"ray.init.address": "10.0.0.1:6379", "ray.remote.num_gpus": 1, "ray.remote.num_cpus": 1,
                         "ray.remote.max_retries": 0}),
])
def test_launcher_presets_compose_with_the_sweep_callback(launcher, expected, monkeypatch):
    """The presets in conf/hydra/launcher extend the plugins' own configs; the sweep callback stays on."""
    import hydra
    from omegaconf import OmegaConf
    from testkit import CONF

    import pipeline.config  # noqa: F401  (registers the schemas)

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra.compose(config_name="config", overrides=[f"hydra/launcher={launcher}", SWEEP[0]],
                            return_hydra_config=True)
    for key, value in expected.items():
        assert OmegaConf.select(cfg.hydra.launcher, key) == value, key
    assert cfg.hydra.callbacks.sweep._target_ == "pipeline.sweep.SweepCallback"
    if launcher == "ray_cluster":  # the saved config holds a reference to the password, never its value
        raw = OmegaConf.to_yaml(cfg.hydra.launcher, resolve=False)
        assert "MLFLOW_TRACKING_PASSWORD: ${oc.env:MLFLOW_TRACKING_PASSWORD,\"\"}" in raw


def test_slurm_gpu_asks_sbatch_for_one_gpu_per_task(tmp_path):
    """gpus_per_task reaches the sbatch script as --gpus-per-task (SLURM then sets each job's CUDA_VISIBLE_DEVICES)."""
    import hydra
    from submitit.slurm.slurm import _make_sbatch_string
    from testkit import CONF

    import pipeline.config  # noqa: F401  (registers the schemas)

    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra.compose(config_name="config", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    script = _make_sbatch_string(command="true", folder=tmp_path, gpus_per_task=cfg.hydra.launcher.gpus_per_task)
    assert "#SBATCH --gpus-per-task=1" in script.splitlines()


def _started(services: cs.Services, start, *args, **kwargs):
    try:
        return start(services, *args, **kwargs)
    except cs.Unavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    stack = cs.Services(tmp_path_factory.mktemp("services"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def server(services, tmp_path_factory):
    """The MLflow server on PostgreSQL, with basic-auth, and a non-admin user for the jobs."""
    postgres = _started(services, cs.start_postgres)
    return cs.start_mlflow_server(services, postgres, tmp_path_factory.mktemp("mlflow-artifacts"))


@pytest.fixture(scope="module")
def slurm(services, server):
    return _started(services, cs.start_slurm)


@pytest.fixture(scope="module")
def ray_address(services, server):
    return _started(services, cs.start_ray, PYTHONPATH=str(REPO / "tests"))  # testkit's models in workers


def job_env(server: dict[str, str], experiment: str, **extra: str) -> dict[str, str]:
    """What the launching shell exports: the server, the user's login, the experiment."""
    return clean_env(MLFLOW_TRACKING_URI=server["uri"], MLFLOW_TRACKING_USERNAME=server["user"],
                     MLFLOW_TRACKING_PASSWORD=server["password"], MLFLOW_EXPERIMENT_NAME=experiment,
                     PYTHONPATH=str(REPO / "tests"), **extra)


def sweep_command(outputs: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "-m", *overrides, f"paths.outputs={outputs}",
            f"hydra.sweep.dir={outputs}/sweep"]


def run_sweep(outputs: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    proc = subprocess.run(sweep_command(outputs, *overrides), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    print(f"sweep {' '.join(overrides)}: exit {proc.returncode} in {time.monotonic() - started:.0f} s")
    return proc


def server_runs(server: dict[str, str], experiment: str):
    """(parents, children by job number) of an experiment, read back through the server as the user."""
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", server["user"])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", server["password"])
        client = MlflowClient(server["uri"])
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], max_results=100) if found else []
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = {int(r.data.tags["sweep.job"]): r for r in runs if r.data.tags.get("sweep.role") != "parent"}
    return parents, children


def summary(server: dict[str, str], experiment: str) -> dict:
    """What must not depend on the launcher: statuses, names, params, metric names, cache hits, engines."""
    parents, children = server_runs(server, experiment)
    assert len(parents) == 1, f"{experiment}: {len(parents)} parent runs"
    parent = parents[0]
    assert all(c.data.tags.get("mlflow.parentRunId") == parent.info.run_id for c in children.values())
    return {
        "parent": parent.info.status,
        # The winner's name is starred, and which job wins is timing noise here: compared without the star.
        "jobs": {n: (c.info.status, c.info.run_name.removeprefix("★ "), c.data.params["compile.min_block_size"],
                     c.data.tags.get("build.key")) for n, c in sorted(children.items())},
        "params": {n: {k: v for k, v in c.data.params.items()} for n, c in sorted(children.items())},
        "metric_names": {n: sorted(c.data.metrics) for n, c in sorted(children.items())},
        "cache": {stage: Counter(c.data.tags.get(f"cache.{stage}") for c in children.values()) for stage in STAGES},
    }


@pytest.fixture(scope="module")
def basic(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("basic")
    proc = run_sweep(out, job_env(server, "basic"), *SWEEP)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return summary(server, "basic")


def assert_matches_basic(proc, server, experiment: str, basic: dict) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "4 jobs, 0 failed" in out
    got = summary(server, experiment)
    assert got["parent"] == basic["parent"] == "FINISHED"
    assert got["jobs"] == basic["jobs"]  # FINISHED, same names and settings, the very same engines
    assert all(status == "FINISHED" for status, *_ in got["jobs"].values()) and len(got["jobs"]) == 4
    assert got["params"] == basic["params"] and got["metric_names"] == basic["metric_names"]
    # Export and lower are built once by one job and hit by the other three, whichever job it was.
    assert got["cache"] == basic["cache"]
    assert got["cache"]["export"] == got["cache"]["lower"] == Counter({"hit": 3, "miss": 1})


def test_slurm_sweep_through_sbatch_matches_the_basic_launcher(server, slurm, basic, tmp_path):
    env = job_env(server, "slurm", SLURM_CONF=slurm["SLURM_CONF"])
    proc = run_sweep(tmp_path, env, "hydra/launcher=submitit_slurm", *SWEEP)
    assert_matches_basic(proc, server, "slurm", basic)
    # Real SLURM jobs: one array of 4 tasks, each recorded by slurmdbd as COMPLETED.
    array = sorted(p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(array) == 4, array
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", array[0].split("_")[0]],
                            env=env, capture_output=True, text=True, timeout=60).stdout.split()
    assert sorted(states) == sorted(f"{a}|COMPLETED" for a in array), states


def test_ray_sweep_on_a_local_cluster_matches_the_basic_launcher(server, ray_address, basic, tmp_path):
    env = job_env(server, "ray", RAY_ADDRESS=ray_address)
    proc = run_sweep(tmp_path, env, "hydra/launcher=ray_cluster", *SWEEP)
    assert_matches_basic(proc, server, "ray", basic)
    assert "Connecting to existing Ray cluster" in proc.stdout + proc.stderr  # not a Ray of its own


def slurm_job_of(pid: int) -> str:
    """The SLURM job (array_task) a process of a job belongs to, from its environment."""
    env = dict(line.split("=", 1) for line in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in line)
    return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"


def test_scancel_mid_build_is_a_failed_row_and_the_sweep_goes_on(server, slurm, tmp_path):
    """Two jobs need one slow export: the one building it is cancelled, the other takes the lock and builds it."""
    env = job_env(server, "scancel", SLURM_CONF=slurm["SLURM_CONF"])
    overrides = ("hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null",
                 "experiment=smoke", "model._target_=testkit.slow_tiny", "+model.kwargs.seconds=12",
                 "compile.min_block_size=1,2")
    proc = subprocess.Popen(sweep_command(tmp_path, *overrides), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        staging = cs.wait_for("a job building export", lambda: next((tmp_path / "cache" / "export").glob(".tmp-*"), None),
                              timeout=300, proc=proc)
        victim = slurm_job_of(int(staging.name.split("-")[-2]))  # .tmp-<key>-<host>-<pid>-<id>
        subprocess.run(["scancel", victim], env=env, check=True, timeout=60)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-4000:]
    assert "2 jobs, 1 failed" in out and "Traceback" not in out
    killed = int(victim.split("_")[1])
    records = {n: json.loads((tmp_path / "sweep" / str(n) / "run.json").read_text()) for n in (0, 1)}
    assert records[killed]["status"] in ("KILLED", "FAILED") and "SIGTERM" in (records[killed]["error"] or "")
    assert records[1 - killed]["status"] == "FINISHED"
    assert f"failed job {killed}" in out  # the summary names it
    # No half-written entry; the one export entry is whole and was built by the job that went on.
    assert half_written(tmp_path / "cache") == []
    entries = [p for p in (tmp_path / "cache" / "export").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    parents, children = server_runs(server, "scancel")
    assert parents[0].info.status == "FAILED"
    assert children[killed].info.status == records[killed]["status"]
    assert children[1 - killed].info.status == "FINISHED"
    assert children[1 - killed].data.tags["cache.export"] == "miss"
    state = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", victim], env=env, capture_output=True,
                           text=True, timeout=60).stdout
    assert state.startswith("CANCELLED"), state


def test_a_ray_worker_killed_mid_build_is_a_failed_row_and_the_sweep_goes_on(server, ray_address, tmp_path):
    """SIGKILL to the Ray worker running the job that builds a shared export: Ray reports the worker lost."""
    import os
    import signal

    env = job_env(server, "raykill", RAY_ADDRESS=ray_address)
    overrides = ("hydra/launcher=ray_cluster", "experiment=smoke", "model._target_=testkit.slow_tiny",
                 "+model.kwargs.seconds=20", "compile.min_block_size=1,2")
    proc = subprocess.Popen(sweep_command(tmp_path, *overrides), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        staging = cs.wait_for("a job building export", lambda: next((tmp_path / "cache" / "export").glob(".tmp-*"), None),
                              timeout=300, proc=proc)
        victim = int(staging.name.split("-")[-2])
        job = next(int(p.parent.name) for p in (tmp_path / "sweep").glob("*/run.json")
                   if json.loads(p.read_text()).get("process", {}).get("pipeline.pid") == str(victim))
        # Killed once its MLflow run is open (it opens while export works): one killed earlier has no child run.
        cs.wait_for("the job's MLflow run", lambda: job in server_runs(server, "raykill")[1], timeout=60, proc=proc)
        assert staging.exists(), "export finished before the job's MLflow run opened"
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-4000:]
    assert "2 jobs, 1 failed" in out and "Ray task" in out and "the sweep goes on" in out
    parents, children = server_runs(server, "raykill")
    assert parents[0].info.status == "FAILED"
    assert children[job].info.status == "FAILED" and children[job].data.tags.get("error")  # closed by the sweep
    assert sorted(c.info.status for c in children.values()) == ["FAILED", "FINISHED"]
    finished = next(c for c in children.values() if c.info.status == "FINISHED")
    assert finished.data.tags["cache.export"] == "miss"  # it took the dead builder's lock and built the export
    entries = [p for p in (tmp_path / "cache" / "export").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    # What SIGKILL leaves is the dead builder's own staging folder, which the next job on this host removes.
    assert all(f"-{victim}-" in p.name for p in half_written(tmp_path / "cache"))


def test_credentials_stay_in_the_environment(server, basic, tmp_path_factory):
    """The password reaches jobs through the environment only: no file a sweep wrote, no param or tag has it."""
    from pipeline.tracking.recovery import StoreUnavailable, preflight

    secret = server["password"]
    for root in {p.parent for p in Path(tmp_path_factory.getbasetemp()).glob("*/sweep")}:
        for path in root.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert secret.encode() not in path.read_bytes(), path
    for experiment in ("basic", "slurm", "ray", "scancel", "raykill"):
        parents, children = server_runs(server, experiment)
        for run in [*parents, *children.values()]:
            assert secret not in json.dumps([run.data.params, run.data.tags])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", server["user"])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(StoreUnavailable, match="refused the credentials"):
            preflight(server["uri"])
