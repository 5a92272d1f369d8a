"""Whole jobs in this process: stage folders and manifests, reports, the cache, failures."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil

import onnxruntime as ort
import pytest
import torch
from testkit import (
    STAGES,
    cache_entries,
    half_written,
    make_runner,
    mlflow_client,
    mlflow_runs,
    run_job,
)

import stages
from pipeline import targets
from pipeline.cache import select
from pipeline.errors import CompileError, ConfigError
from pipeline.files import read_manifest

MANIFEST_KEYS = {"stage", "version", "key", "inputs", "config", "env", "wall_seconds", "files"}
LATENCY_KEYS = {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "cv", "throughput_per_s"}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. end to end ------------------------------------------------------------------------

def test_job_finishes_on_onnxruntime(tiny_job):
    r = tiny_job.result
    assert r.status == "FINISHED" and r.error is None
    assert r.target == "onnxruntime" and tiny_job.runner.config["target"]["providers"] == ["CPUExecutionProvider"]
    assert [s.name for s in r.stages] == list(STAGES)
    assert not any(s.hit for s in r.stages)  # first job on an empty cache builds everything
    for stage in STAGES:
        assert r.metrics[f"{stage}_seconds"] >= 0
    run = tiny_job.json("run.json")
    assert run["status"] == "FINISHED" and [s["name"] for s in run["stages"]] == list(STAGES)
    assert (tiny_job.run_dir / "config.yaml").is_file()


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_folder_has_a_true_manifest(tiny_job, stage):
    folder = tiny_job.run_dir / stage
    manifest = json.loads((folder / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    spec = stages.BY_NAME[stage]
    record = tiny_job.record(stage)
    assert (manifest["stage"], manifest["version"], manifest["key"]) == (stage, spec.version, record.key)
    assert manifest["upstream"] == {up: tiny_job.record(up).key for up in spec.inputs}
    for up in spec.inputs:  # keyed by the upstream key, or by the hashes of the files it reads
        files = spec.content.get(up)
        if files is None:
            assert manifest["inputs"][up] == tiny_job.record(up).key
        else:
            listed = {f["path"]: f["sha256"] for f in json.loads((tiny_job.run_dir / up / "manifest.json").read_text())["files"]}
            assert manifest["inputs"][up] == {f: listed[f] for f in files}
    assert manifest["config"] == select(tiny_job.runner.config, spec.reads)
    target = targets.make("onnxruntime", tiny_job.runner.config["target"])
    assert manifest["target"] == (target.key_material(spec.asks) if spec.asks else {})
    # Only the libraries this stage and its target use: onnxruntime's version is not in export's key.
    libraries = manifest["env"]["libraries"]
    assert libraries["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert ("onnxruntime" in libraries) == (stage in ("partition", "convert", "build", "validate"))
    assert "tensorrt_rtx" not in libraries
    if "onnxruntime" in libraries:
        assert libraries["onnxruntime"] == ort.__version__
    assert {"python", "device", "compute_capability"} <= set(manifest["env"])
    assert manifest["wall_seconds"] > 0
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk and on_disk
    assert set(spec.written_files()) <= on_disk  # every file the spec declares
    for rel, f in listed.items():
        assert f["bytes"] == (folder / rel).stat().st_size
        assert f["sha256"] == sha256(folder / rel)
    assert read_manifest(folder) == manifest


def test_partition_report(tiny_job):
    report = tiny_job.json("partition/report.json")
    segs = report["segments"]
    assert segs and {s["kind"] for s in segs} <= {"accelerated", "torch"}
    for s in segs:
        assert s["op_count"] == sum(s["ops"].values()) > 0
        assert all(op.startswith("aten.") for op in s["ops"])
    # tiny_cnn is all supported: one engine holding every op of the lowered program.
    lowered = tiny_job.json("lower/ops.json")["after"]
    assert [s["kind"] for s in segs] == ["accelerated"]
    assert segs[0]["ops"] == lowered
    assert report["totals"]["ops"] == sum(lowered.values()) == segs[0]["op_count"]
    assert report["totals"]["accelerated_op_fraction"] == 1.0 and report["kept_in_torch"] == {}
    assert tiny_job.json("partition/recipe.json")[0]["name"] == segs[0]["name"] == "accel_0"
    assert tiny_job.result.metrics["num_accelerated_segments"] == 1


def test_validate_report(tiny_job):
    report = tiny_job.json("validate/report.json")
    assert report["passed"] is True and report["failures"] == []
    acc = report["accuracy"]
    assert acc["rel_l2_err"] <= 1e-3 and acc["cosine_similarity"] >= 0.9999 and acc["finite"]
    assert acc["top1_agreement"] == 1.0
    lat = report["latency"]
    for name in ("compiled", "eager"):
        stats = lat[name]
        assert LATENCY_KEYS <= set(stats)
        assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
        assert stats["iterations"] >= 10
        assert stats["throughput_per_s"] == pytest.approx(1000.0 / stats["mean_ms"])
        assert stats["cv"] == pytest.approx(stats["std_ms"] / stats["mean_ms"])
    assert lat["speedup"] == pytest.approx(lat["eager"]["p50_ms"] / lat["compiled"]["p50_ms"])
    assert tiny_job.result.metrics["speedup"] == pytest.approx(lat["speedup"])
    # One thread budget for both sides, at most the cores this process may use, recorded with its reason.
    assert 1 <= lat["threads"]["threads"] <= len(os.sched_getaffinity(0))
    assert lat["threads"]["reason"].startswith("auto: ")
    assert tiny_job.result.metrics["latency_threads"] == lat["threads"]["threads"]


def test_eager_and_the_engine_get_one_thread_budget(tiny_job, tmp_path):
    """validate.threads sizes torch and ONNX Runtime's pool alike; a pool size the user fixed is given to eager too."""
    one = run_job(tmp_path / "a", "target=onnxruntime", "validate.threads=1", "tracking.enabled=false",
                  cache=tiny_job.cache)
    assert one.json("validate/report.json")["latency"]["threads"] == {"threads": 1, "reason": "validate.threads=1"}
    assert one.result.metrics["latency_threads"] == 1
    fixed = run_job(tmp_path / "b", "target=onnxruntime", "validate.threads=1", "target.intra_op_num_threads=2",
                    "tracking.enabled=false", cache=tiny_job.cache)
    threads = fixed.json("validate/report.json")["latency"]["threads"]
    assert threads["threads"] == 2 and "so eager gets 2 too" in threads["reason"]


def test_build_has_the_engines(tiny_job):
    engines = tiny_job.json("build/engines.json")
    assert engines["target"] == "onnxruntime" and len(engines["segments"]) == 1
    seg = engines["segments"][0]
    engine = tiny_job.run_dir / "build" / seg["engine"]
    assert engine.name == "accel_0.ort.onnx" and engine.stat().st_size > 1000
    assert (tiny_job.run_dir / "convert" / seg["onnx"]).is_file()
    session = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: torch.randn(1, 3, 64, 64).numpy()})
    assert out.shape == (1, 10)
    assert tiny_job.result.metrics["engine_bytes"] == engine.stat().st_size


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine auto may rightly pick TensorRT")
def test_target_auto_picks_onnxruntime_and_says_why(tmp_path):
    runner, _, _ = make_runner(tmp_path, "target=auto")
    assert runner.requested == "auto"
    assert runner.target_name == "onnxruntime"
    assert runner.config["target"]["name"] == "onnxruntime"
    assert runner.config["target"]["providers"] == ["CPUExecutionProvider"]
    reason = runner.target_reason
    assert reason.startswith("target=auto chose onnxruntime@cpu (")
    # Both TensorRT routes come first in `prefer`; the reason says why each was passed over.
    assert "(not torch_tensorrt: " in reason and "; not tensorrt: " in reason
    if importlib.util.find_spec("torch_tensorrt") is None:
        assert "torch_tensorrt is not installed" in reason
    if not torch.cuda.is_available():  # TensorRT may be installed (TensorRT-RTX builds on CPUs) but cannot run
        tensorrt_why = reason.split("; not tensorrt:", 1)[1]
        assert "not installed" in tensorrt_why or "GPU" in tensorrt_why


# --- 7. the cache -------------------------------------------------------------------------

def test_second_identical_run_hits_every_stage_but_validate(tiny_job, tmp_path):
    again = run_job(tmp_path, "target=onnxruntime", cache=tiny_job.cache)
    assert again.result.status == "FINISHED"
    hits = {s.name: s.hit for s in again.result.stages}
    assert hits == {**{s: True for s in STAGES}, "validate": False}
    assert [s.key for s in again.result.stages] == [s.key for s in tiny_job.result.stages]
    for stage in STAGES[:-1]:  # the run folder holds hard links to the cache entries it used
        key = again.record(stage).key
        for f in json.loads((again.run_dir / stage / "manifest.json").read_text())["files"]:
            assert os.path.samefile(again.run_dir / stage / f["path"], tiny_job.cache / stage / key / f["path"])
    assert not (tiny_job.cache / "validate").exists()  # measurements are not cached by default
    assert again.json("validate/report.json")["passed"] is True


def test_validate_cache_reuses_the_measurement(tiny_job, tmp_path):
    first = run_job(tmp_path / "a", "target=onnxruntime", "validate.cache=true", cache=tiny_job.cache)
    second = run_job(tmp_path / "b", "target=onnxruntime", "validate.cache=true", cache=tiny_job.cache)
    assert first.record("validate").hit is False and second.record("validate").hit is True
    assert all(s.hit for s in second.result.stages)
    assert second.json("validate/report.json") == first.json("validate/report.json")


def test_changing_a_partition_setting_keeps_export_and_lower(tiny_job, tmp_path):
    job = run_job(tmp_path, "target=onnxruntime", "compile.require_full_compilation=true", cache=tiny_job.cache)
    hits = {s.name: s.hit for s in job.result.stages}
    # Everything is supported, so full compilation gives the same split: convert and build are
    # shared too (their keys hold the recipe's hash, not the partition settings).
    assert hits == {"export": True, "lower": True, "partition": False, "convert": True,
                    "build": True, "validate": False}
    report = job.json("partition/report.json")
    assert report["totals"]["accelerated_segments"] == 1 and report["kept_nodes"] == []
    assert job.result.status == "FINISHED"


def test_targets_that_lower_alike_share_the_lowered_program(tiny_job, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    job = run_job(tmp_path, "target=tensorrt", cache=tiny_job.cache)
    assert job.record("export").hit and job.record("lower").hit  # lowered once for onnxruntime
    assert not job.record("partition").hit  # but partitioned for tensorrt


BUILDING_STAGES = STAGES[:-1]  # validate measures, it is not reused by default


def test_renaming_the_model_rebuilds_nothing(tiny_job, tmp_path):
    """model.name, model.task and input.name are labels: the same factory and weights hit every entry."""
    job = run_job(tmp_path, "target=onnxruntime", "model.name=my_renamed_cnn", "model.task=detection",
                  "input.name=my_images", "tracking.enabled=false", cache=tiny_job.cache)
    assert job.result.status == "FINISHED"
    assert {s: job.record(s).hit for s in BUILDING_STAGES} == {s: True for s in BUILDING_STAGES}
    assert [job.record(s).key for s in BUILDING_STAGES] == [tiny_job.record(s).key for s in BUILDING_STAGES]
    assert "top1_agreement" not in job.result.metrics  # the label it reads (task) is still honoured


def test_session_settings_are_applied_at_load_not_keyed(tiny_job, tmp_path):
    """ONNX Runtime's thread and spinning settings change no built byte; the loading job's values apply."""
    job = run_job(tmp_path, "target=onnxruntime", "target.allow_spinning=false", "target.intra_op_num_threads=1",
                  "target.execution_mode=parallel", "tracking.enabled=false", cache=tiny_job.cache)
    assert job.result.status == "FINISHED"
    assert all(job.record(s).hit for s in BUILDING_STAGES)
    # The engine list carries no run-time setting: the cached build serves every such job alike.
    assert "allow_spinning" not in job.json("build/engines.json")["settings"]
    from pipeline import hybrid

    target = targets.make("onnxruntime", job.runner.config["target"])
    module = hybrid.assemble(job.run_dir / "lower", job.run_dir / "partition", job.run_dir / "build", target)
    session = module.get_submodule("accel_0").runner.session
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # A build setting still misses build (and only build: convert reads nothing of it).
    other = run_job(tmp_path / "b", "target=onnxruntime", "target.graph_optimization_level=basic",
                    "tracking.enabled=false", cache=tiny_job.cache)
    assert [other.record(s).hit for s in BUILDING_STAGES] == [True, True, True, True, False]


# --- 6a. a corrupt cache entry is a miss and is rebuilt ---------------------------------

@pytest.mark.parametrize("damage", ["truncate", "same_size_garbage"])
def test_corrupt_cache_entry_is_rebuilt(tiny_job, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_job.cache, cache)  # copies, so the shared cache stays whole
    key = tiny_job.record("export").key
    program = cache / "export" / key / "program.pt2"
    size = program.stat().st_size
    program.chmod(0o644)  # cache files are read-only: damage them as someone who can write would
    if damage == "truncate":
        with open(program, "r+b") as f:
            f.truncate(size // 2)
    else:
        program.write_bytes(b"\x00" * size)
    assert read_manifest(cache / "export" / key) is None

    job = run_job(tmp_path / "out", "target=onnxruntime", cache=cache)
    assert job.result.status == "FINISHED"
    assert job.record("export").hit is False and job.record("export").key == key
    assert job.record("lower").hit is True  # same key downstream: still valid
    assert read_manifest(cache / "export" / key) is not None
    assert os.path.samefile(job.run_dir / "export" / "program.pt2", program)
    assert job.json("validate/report.json")["passed"] is True
    assert half_written(cache) == []


# --- 5. bad input in process: FAILED run, nothing half-written ---------------------------

BAD = {
    "input_shape": (["input.tensors.0.shape=[1,5,64,64]"], ConfigError, "does not fit model tiny_cnn", "export"),
    "unknown_op": (["compile.torch_executed_ops=[aten.reluu.default]"], ConfigError, "aten.reluu.default", None),
    "full_compilation": (["compile.require_full_compilation=true", "compile.torch_executed_ops=[aten.relu.default]"],
                         CompileError, "require_full_compilation=true", "partition"),
    "unknown_factory": (["model._target_=pipeline.zoo.nope"], ConfigError, "cannot be imported", "export"),
    "accuracy": (["validate.tolerances.fp32.rel_l2_err=1e-30"], CompileError,
                 "validation failed", None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_cleanly(tiny_job, tmp_path, case):
    extra, error, text, failing_stage = BAD[case]
    cache = tiny_job.cache
    before = {s: cache_entries(cache, s) for s in STAGES}
    runner, _, run_dir = make_runner(tmp_path, "target=onnxruntime", *extra, cache=cache)
    from pipeline.tracking import Tracker

    with pytest.raises(error, match=re.escape(text)) as info:
        runner.run(Tracker(runner.config["tracking"]))
    assert "\n" not in info.value.one_line() and "Fix:" in info.value.one_line()

    assert half_written(cache) == []
    if failing_stage:
        assert cache_entries(cache, failing_stage) == before[failing_stage]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "FAILED" and text in run["error"]

    (mlrun,) = mlflow_runs(mlflow_client(tmp_path))
    assert mlrun.info.status == "FAILED"
    assert text in mlrun.data.tags["error"] and mlrun.data.tags["status"] == "FAILED"
    if case == "accuracy":  # the measurement that failed is kept for the user to read
        report = json.loads((run_dir / "validate" / "report.json").read_text())
        assert report["passed"] is False
        assert any("rel_l2_err" in f for f in report["failures"])


def test_unknown_target_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="unknown target 'nope'"):
        make_runner(tmp_path, "target.name=nope")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()



def test_sweep_preloads_name_modules_that_exist():
    """Target.sweep_preload is imported by name in the stage worker's server: a typo would fail every sweep."""
    for name, cls in targets.registry().items():
        for module in cls.sweep_preload:
            assert importlib.util.find_spec(module) is not None, f"{name}: {module}"
    assert targets.target_class("onnxruntime").sweep_preload  # the ONNX registry partition needs
