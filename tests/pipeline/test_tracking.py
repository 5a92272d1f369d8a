"""What a job records in MLflow, read back from the SQLite store with MlflowClient."""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from testkit import REPO, STAGES, artifact_paths, mlflow_client, mlflow_runs, run_job

METRICS = ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput_per_s", "eager/latency_p50_ms",
           "speedup", "max_abs_err", "rel_l2_err", "cosine_similarity", "top1_agreement", "num_segments",
           "num_accelerated_segments", "accelerated_op_fraction", "engine_bytes")


@pytest.fixture(scope="module")
def tracked(tiny_job):
    client = mlflow_client(tiny_job.outputs)
    (run,) = mlflow_runs(client)
    return client, run


def test_run_is_finished_and_matches_the_job(tiny_job, tracked):
    client, run = tracked
    assert run.info.status == "FINISHED"
    assert run.info.run_id == tiny_job.result.tracking["run_id"]
    assert re.fullmatch(r"tiny_cnn onnxruntime \d\d-\d\d \d\d:\d\d:\d\d", run.info.run_name)
    assert tiny_job.result.tracking["tracking_uri"] == f"sqlite:///{(tiny_job.outputs / 'mlflow.db').resolve()}"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "pipeline"
    assert exp.artifact_location == (tiny_job.outputs / "mlartifacts" / "pipeline").resolve().as_uri()


def test_params_are_the_settings_that_matter(tracked):
    _, run = tracked
    p = run.data.params
    assert p["model.name"] == "tiny_cnn"
    assert p["compile.min_block_size"] == "5"
    assert p["compile.require_full_compilation"] == "False"
    assert p["target.name"] == "onnxruntime"
    assert p["input.x"] == "1x3x64x64 float32"  # a shape a person reads, not a Python repr
    assert p["validate.iterations"] == "10"
    assert p["validate.tolerances.fp32.rel_l2_err"] == "0.001"
    # Folders, tracking settings and other precisions' tolerances are noise in the runs table.
    assert not [k for k in p if k.startswith(("paths.", "tracking.", "validate.tolerances.fp16"))]
    assert "verbose" not in p and "input.tensors" not in p


def test_metrics(tiny_job, tracked):
    _, run = tracked
    m = run.data.metrics
    missing = [k for k in (*METRICS, *(f"{s}_seconds" for s in STAGES)) if k not in m]
    assert not missing
    for key in METRICS:
        assert m[key] == pytest.approx(tiny_job.result.metrics[key])
    assert m["num_segments"] == 1 and m["num_accelerated_segments"] == 1
    assert m["accelerated_op_fraction"] == 1.0 and m["top1_agreement"] == 1.0
    assert m["engine_bytes"] == (tiny_job.run_dir / "build" / "accel_0.ort.onnx").stat().st_size
    assert m["latency_p50_ms"] <= m["latency_p90_ms"] <= m["latency_p99_ms"]
    # Eager's figures live under eager/: no metric name is another's prefix with an underscore.
    assert not [k for k in m if k.startswith(("eager_", "best_"))]
    assert m["rel_l2_err_log10"] == pytest.approx(math.log10(max(m["rel_l2_err"], 1e-30)))


def test_tags(tracked):
    _, run = tracked
    t = run.data.tags
    assert t["target"] == "onnxruntime" and t["model"] == "tiny_cnn"
    assert t["device"]
    assert t["lib.torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert "lib.onnxruntime" in t
    commit = t["git_commit"]
    assert len(commit) == 40 and int(commit, 16) >= 0
    # The commit checked out when the job ran: HEAD itself, or an ancestor if HEAD moved on since.
    check = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO)
    assert check.returncode == 0
    assert {t[f"cache.{s}"] for s in STAGES} == {"miss"}
    assert t["status"] == "FINISHED" and "error" not in t and "failed_stage" not in t


def test_trust_signals(tiny_job, tracked):
    _, run = tracked
    t, m = run.data.tags, run.data.metrics
    assert t["build.key"] == tiny_job.record("build").key and len(t["engine.sha256"]) == 64
    noisy = m["latency_median_spread"] > 0.05  # validate.spread_warn_threshold
    assert t["latency.trusted"] == ("false" if noisy else "true") and m["latency_trusted"] == float(not noisy)
    eager_noisy = m["eager/latency_median_spread"] > 0.05
    assert t["eager.latency.trusted"] == ("false" if eager_noisy else "true")
    if noisy or eager_noisy:
        assert "varies too much to trust" in t["warnings"]


def test_artifacts(tiny_job, tracked):
    client, run = tracked
    paths = artifact_paths(client, run.info.run_id)
    expected = {"build/accel_0.ort.onnx", "build/engines.json", "partition/report.json",
                "partition/recipe.json", "validate/report.json", "config.yaml", "run.json",
                *(f"{s}/manifest.json" for s in STAGES)}
    assert expected <= paths
    local = Path(client.download_artifacts(run.info.run_id, "build/accel_0.ort.onnx", str(tiny_job.outputs / "dl")))
    assert local.read_bytes() == (tiny_job.run_dir / "build" / "accel_0.ort.onnx").read_bytes()
    # A local store holds the engine as a hard link of the cache's read-only file, not a second copy.
    stored = Path(urlparse(run.info.artifact_uri).path) / "build" / "accel_0.ort.onnx"
    assert os.path.samefile(stored, tiny_job.run_dir / "build" / "accel_0.ort.onnx")


def test_experiment_name_from_the_environment(tiny_job, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pytest-experiment")
    job = run_job(tmp_path, "target=auto", cache=tiny_job.cache)
    assert job.result.tracking["experiment"] == "pytest-experiment"
    client = mlflow_client(tmp_path)
    (run,) = mlflow_runs(client, "pytest-experiment")
    assert run.info.run_id == job.result.tracking["run_id"] and run.info.status == "FINISHED"
    assert mlflow_runs(client, "pipeline") == []
    exp = client.get_experiment_by_name("pytest-experiment")
    assert exp.artifact_location == (tmp_path / "mlartifacts" / "pytest-experiment").resolve().as_uri()
    # target=auto ran on onnxruntime; the tags say what was asked and why it was chosen.
    t = run.data.tags
    assert (t["target"], t["target.requested"]) == (job.result.target, "auto")
    assert t["target.reason"] == job.result.target_reason
    if not torch.cuda.is_available():
        assert t["target"] == "onnxruntime" and "not tensorrt: " in t["target.reason"]


def test_tracking_uri_from_the_environment(tiny_job, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root for such a store is ./mlruns
    job = run_job(tmp_path / "out", "target=onnxruntime", "tracking.log_artifacts=false", cache=tiny_job.cache)
    assert job.result.tracking["tracking_uri"] == uri
    assert not (tmp_path / "out" / "mlflow.db").exists()
    (run,) = mlflow_runs(mlflow_client(uri=uri))
    assert run.info.status == "FINISHED" and run.data.tags["cache.export"] == "hit"


def test_tracking_disabled_writes_no_store(tiny_job, tmp_path):
    job = run_job(tmp_path, "target=onnxruntime", "tracking.enabled=false", cache=tiny_job.cache)
    assert job.result.status == "FINISHED" and "recorded" not in job.result.tracking
    assert not (tmp_path / "mlflow.db").exists()


def test_engines_are_uploaded_once_per_build(tiny_job, tmp_path):
    """Two jobs with the same build key: the second records a reference, not another copy."""
    first = run_job(tmp_path, "target=onnxruntime", cache=tiny_job.cache)
    second = run_job(tmp_path, "target=onnxruntime", "target.intra_op_num_threads=1", cache=tiny_job.cache,
                     run_dir=tmp_path / "run2")
    client = mlflow_client(tmp_path)
    runs = {r.info.run_id: r for r in mlflow_runs(client)}
    one, two = runs[first.result.tracking["run_id"]], runs[second.result.tracking["run_id"]]
    assert one.data.tags["build.key"] == two.data.tags["build.key"]
    assert "build/accel_0.ort.onnx" in artifact_paths(client, one.info.run_id)
    logged = artifact_paths(client, two.info.run_id)
    assert "build/accel_0.ort.onnx" not in logged and "build/engines.json" in logged
    assert "export/program.pt2" not in logged and "export/program.pt2" in artifact_paths(client, one.info.run_id)
    assert two.data.tags["files.build"] == one.info.run_id and one.data.tags["stored.build"] == one.data.tags["build.key"]


LOAD_FROM_MLFLOW = r"""
import sys
import torch
import pipeline
x = torch.load(sys.argv[2])
with torch.no_grad():
    y = pipeline.load(sys.argv[1])(x)
torch.save(y[0] if isinstance(y, (tuple, list)) else y, sys.argv[3])
"""


def test_pipeline_load_of_an_mlflow_run_in_a_fresh_process(tiny_job, tmp_path):
    """runs:/<id> of a run that stored nothing itself (a cache hit): its files come from the run that did."""
    import sys

    from testkit import REPO, clean_env

    first = run_job(tmp_path, "target=onnxruntime", cache=tiny_job.cache)
    second = run_job(tmp_path, "target=onnxruntime", cache=tiny_job.cache, run_dir=tmp_path / "run2")
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", LOAD_FROM_MLFLOW, f"runs:/{second.result.tracking['run_id']}",
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env=clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}",
                                        PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pipeline

    with torch.no_grad():
        expected = pipeline.load(first.run_dir)(x)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-6)
