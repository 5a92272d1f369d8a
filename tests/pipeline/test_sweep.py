"""Sweeps as users run them (`python -m pipeline -m ...`): parent and child runs, a failing job
that does not stop the others, the end-of-sweep comparison, parallel joblib workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import (
    REPO,
    cache_entries,
    clean_env,
    half_written,
    mlflow_client,
    mlflow_runs,
    overrides,
)

from pipeline.files import read_manifest


def run_sweep(tmp: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", "-m", *overrides(tmp, extra, tmp / "cache"), f"hydra.sweep.dir={tmp}/sweep"]
    # testkit's models (tests/) must import in the job processes too.
    env = clean_env(PYTHONPATH=str(REPO / "tests"))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def children_and_parent(tmp: Path):
    runs = mlflow_runs(mlflow_client(tmp))
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = sorted((r for r in runs if r.data.tags.get("sweep.role") != "parent"),
                      key=lambda r: int(r.data.tags["sweep.job"]))
    return parents, children


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    # A loaded machine must not turn the one finished job's latency untrusted (no winner is named on noise).
    proc = run_sweep(tmp, "compile.torch_executed_ops=[aten.relu.default]",
                     "compile.require_full_compilation=false,true", "register=true", "validate.spread_warn_threshold=100")
    return tmp, proc


def test_failing_job_does_not_stop_the_sweep_and_the_exit_says_so(failing_sweep):
    tmp, proc = failing_sweep
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert "2 jobs, 1 failed" in out
    assert "require_full_compilation=true but" in out  # the failed job's own message, in the summary
    runs = [json.loads((tmp / "sweep" / str(i) / "run.json").read_text()) for i in (0, 1)]
    assert [r["status"] for r in runs] == ["FINISHED", "FAILED"]


def test_one_parent_with_a_finished_and_a_failed_child(failing_sweep):
    tmp, _ = failing_sweep
    (parent,), children = children_and_parent(tmp)
    assert [c.info.status for c in children] == ["FINISHED", "FAILED"]
    sweep_id = parent.data.tags["sweep.id"]
    for job, child in enumerate(children):
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["sweep.id"] == sweep_id and tags["sweep.job"] == str(job)
        assert f"require_full_compilation={'false' if job == 0 else 'true'}" in tags["sweep.overrides"].lower()
        # Named by the values the sweep varies and the target first (the runs table cuts names), the keys after;
        # the winner's name starts with a star.
        star = "★ " if job == 0 else ""
        assert child.info.run_name.lower() == f"{star}{'false' if job == 0 else 'true'} onnxruntime · require_full_compilation"
    assert "require_full_compilation=true but" in children[1].data.tags["error"]
    client = mlflow_client(tmp)
    assert "console.log" in {a.path for a in client.list_artifacts(children[1].info.run_id)}
    assert parent.info.status == "FAILED"
    assert parent.data.tags["jobs.total"] == "2" and parent.data.tags["jobs.failed"] == "1"
    assert parent.data.tags["best.job"] == "0"
    assert parent.info.run_name == "sweep require_full_compilation=false,true"
    # The winner on the parent: its run, its figures, and the comparison as the parent's description.
    assert parent.data.tags["best.run_id"] == children[0].info.run_id
    assert "★ " + parent.data.tags["best.run_name"] == children[0].info.run_name
    assert parent.data.metrics["best/latency_p50_ms"] == children[0].data.metrics["latency_p50_ms"]
    note = parent.data.tags["mlflow.note.content"]
    assert "| job |" in note.replace("|  |", "| job |") and "require_full_compilation=true but" in note
    assert [c.data.tags["best"] for c in children] == ["true", "false"]
    assert children[0].data.tags["pareto"] == "true"
    for child in children:
        assert not any(k.startswith(("paths.", "tracking.")) for k in child.data.params)
    assert children[1].data.tags["failed_stage"] == "partition"
    best = client.get_model_version_by_alias("tiny_cnn", "best")  # register=true: the winner, registered
    assert best.run_id == children[0].info.run_id
    for tag in ("build.key", "engine.sha256", "latency.trusted"):
        assert tag in children[0].data.tags
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "pareto.png", "stage_times.png"} <= logged


def test_report_files_in_the_sweep_folder(failing_sweep):
    tmp, _ = failing_sweep
    report = tmp / "sweep" / "compare"
    md = (report / "comparison.md").read_text()
    assert "FINISHED" in md and "FAILED" in md
    assert (report / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((tmp / "sweep" / "sweep.json").read_text())
    assert info["jobs"] == 2 and info["failed"] == 1


def test_jobs_share_export_and_lower(failing_sweep):
    tmp, _ = failing_sweep
    cache = tmp / "cache"
    assert len(cache_entries(cache, "export")) == 1 and len(cache_entries(cache, "lower")) == 1
    assert half_written(cache) == []


def test_four_parallel_joblib_jobs_all_land(tmp_path):
    proc = run_sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                     "compile.min_block_size=1,2,3,4")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "database is locked" not in out
    (parent,), children = children_and_parent(tmp_path)
    assert [c.info.status for c in children] == ["FINISHED"] * 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs.failed"] == "0"
    cache = tmp_path / "cache"
    assert len(cache_entries(cache, "export")) == 1 and half_written(cache) == []
    for stage in ("export", "lower", "partition", "convert", "build"):
        for entry in cache_entries(cache, stage):
            assert read_manifest(entry) is not None, entry


def test_autotune_goes_on_past_failed_trials_and_tags_the_best(tmp_path):
    proc = run_sweep(tmp_path, "sweep=autotune_smoke")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out  # failed trials are part of a search; it fails only if none worked
    (parent,), children = children_and_parent(tmp_path)
    statuses = [c.info.status for c in children]
    assert len(children) == 6 and "FAILED" in statuses and "FINISHED" in statuses
    assert parent.info.status == "FINISHED"
    best = parent.data.tags["best.params"]
    assert "compile.require_full_compilation=False" in best or "compile.require_full_compilation=false" in best
    assert "autotune best" in out and (tmp_path / "sweep" / "optimization_results.yaml").is_file()


def test_a_killed_worker_is_a_failed_row_and_the_sweep_still_reports(tmp_path):
    proc = run_sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "model._target_=testkit.tiny_or_dying", "+model.kwargs.die=false,true")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "2 jobs, 1 failed" in out or "2 jobs, 2 failed" in out, out[-3000:]
    assert "worker stopped before it recorded a result" in out
    (parent,), children = children_and_parent(tmp_path)
    assert parent.info.status == "FAILED"
    assert all(c.info.status != "RUNNING" for c in children)


def test_compare_fits_120_columns_when_piped(failing_sweep):
    tmp, _ = failing_sweep
    proc = subprocess.run([sys.executable, "-m", "pipeline.compare", "--sweep", "latest", "--store",
                           str(tmp / "mlflow.db")], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 120
    overrides = "".join(line.split("│")[3].strip() for line in lines if line.startswith("│"))
    assert "require_full_compilation=true" in overrides.lower()  # the full value, wrapped inside its cell


def test_int8_sweep_over_calibration_and_kept_layers_lands_on_the_pareto_plot(tmp_path):
    """Calibration settings and layers kept in fp32 are settings like any other: one row and point each."""
    import csv

    proc = run_sweep(tmp_path, "compile.precision=int8", "quantize.max_rounds=0",
                     "calibration.method=minmax,entropy", "quantize.exclude=[],[accel_0/node_Conv_22]")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "4 jobs, 0 failed" in out
    with open(tmp_path / "sweep" / "compare" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"FINISHED"}
    varied = {(("entropy" in r["overrides"]), ("node_Conv_22" in r["overrides"])) for r in rows}
    assert len(varied) == 4  # every combination is its own job
    assert any(r["pareto_front"] == "1" for r in rows)
    assert all(float(r["int8_mac_fraction"]) > 0 for r in rows)
    kept = [float(r["int8_mac_fraction"]) for r in rows if "node_Conv_22" in r["overrides"]]
    assert max(kept) < 1.0  # the excluded layer really ran in fp32
    _, children = children_and_parent(tmp_path)
    assert {c.data.params["calibration.method"] for c in children} == {"minmax", "entropy"}
    assert all(c.data.tags["pareto"] in ("true", "false") for c in children)
    assert (tmp_path / "sweep" / "compare" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
