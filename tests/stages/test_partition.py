"""Partition semantics (Torch-TensorRT's): torch_executed_ops, min_block_size,
require_full_compilation, unsupported custom ops, and the eager target.

The ResNet-18 jobs (input=image_64) share one session cache, so export and lower run once.
"""

from __future__ import annotations

import json
import re

import pytest
from testkit import (
    ORT_1_THREAD,
    RESNET18,
    STAGES,
    cache_entries,
    half_written,
    make_runner,
    mlflow_client,
    mlflow_runs,
)

from pipeline.errors import CompileError, ConfigError
from pipeline.ops import resolve as resolve_ops


def accelerated(report):
    return [s for s in report["segments"] if s["kind"] == "accelerated"]


def check_accounting(job):
    """Segments partition the lowered program's ops exactly; metrics agree with the report."""
    report = job.json("partition/report.json")
    lowered = job.json("lower/ops.json")["after"]
    totals = report["totals"]
    assert sum(s["op_count"] for s in report["segments"]) == totals["ops"] == sum(lowered.values())
    merged: dict[str, int] = {}
    for s in report["segments"]:
        assert s["op_count"] == sum(s["ops"].values())
        for op, n in s["ops"].items():
            merged[op] = merged.get(op, 0) + n
    assert merged == lowered
    kinds = [s["kind"] for s in report["segments"]]
    assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False)), kinds  # runs are maximal
    n_accel = len(accelerated(report))
    assert job.result.metrics["num_accelerated_segments"] == totals["accelerated_segments"] == n_accel
    assert job.result.metrics["num_segments"] == len(report["segments"])
    assert len(job.json("partition/recipe.json")) == n_accel
    engines = job.json("build/engines.json")["segments"]
    assert [e["name"] for e in engines] == [s["name"] for s in accelerated(report)]
    for e in engines:
        assert (job.run_dir / "build" / e["engine"]).stat().st_size > 0
    kept = sum(v["count"] for v in report["kept_in_torch"].values())
    assert kept == totals["torch_ops"] == len(report["kept_nodes"])
    return report


def assert_passed(job):
    assert job.result.status == "FINISHED"
    validate = job.json("validate/report.json")
    assert validate["passed"] is True and validate["failures"] == []
    assert validate["accuracy"]["rel_l2_err"] <= 1e-3
    assert validate["accuracy"]["top1_agreement"] == 1.0


# --- (a) torch_executed_ops ---------------------------------------------------------------

def test_torch_executed_ops_splits_resnet18(resnet18_hybrid):
    job = resnet18_hybrid
    report = check_accounting(job)
    n_adds = job.json("lower/ops.json")["after"]["aten.add.Tensor"]
    assert n_adds == 8  # one per residual block
    segs = accelerated(report)
    assert len(segs) >= 2
    assert all("aten.add.Tensor" not in s["ops"] for s in segs)
    kept = report["kept_in_torch"]["aten.add.Tensor"]
    assert kept["count"] == n_adds
    assert all("torch_executed_ops" in reason for reason in kept["reasons"])
    add_nodes = [n for n in report["kept_nodes"] if n["op"] == "aten.add.Tensor"]
    assert len(add_nodes) == n_adds and all("torch_executed_ops" in n["reason"] for n in add_nodes)
    # Every add sits in a PyTorch segment between engines.
    torch_adds = sum(s["ops"].get("aten.add.Tensor", 0) for s in report["segments"] if s["kind"] == "torch")
    assert torch_adds == n_adds
    assert report["settings"]["torch_executed_ops"] == ["aten.add.Tensor"]
    for s in segs:
        assert s["inputs"] and s["outputs"]
        assert all(v["shape"][0] == 1 for v in s["inputs"] + s["outputs"] if v)
    assert_passed(job)
    assert job.result.metrics["accelerated_op_fraction"] == pytest.approx(
        report["totals"]["accelerated_ops"] / report["totals"]["ops"], abs=1e-6)


# --- (b) min_block_size -------------------------------------------------------------------

def test_min_block_size_larger_than_any_block(resnet18_no_blocks):
    job = resnet18_no_blocks
    report = check_accounting(job)
    assert job.result.metrics["num_accelerated_segments"] == 0
    assert report["totals"]["accelerated_ops"] == 0 and report["totals"]["accelerated_op_fraction"] == 0.0
    assert [s["kind"] for s in report["segments"]] == ["torch"]
    assert report["kept_in_torch"]
    for op, info in report["kept_in_torch"].items():
        assert all("min_block_size=100000" in reason for reason in info["reasons"]), op
    assert job.json("partition/recipe.json") == []
    assert job.json("build/engines.json")["segments"] == []
    assert job.result.metrics["engine_bytes"] == 0
    assert_passed(job)
    # export and lower came from the shared cache
    assert job.record("export").hit and job.record("lower").hit


def test_min_block_size_only_changes_partition_onwards(resnet18_hybrid, resnet18_no_blocks):
    for stage in ("export", "lower"):
        assert resnet18_no_blocks.record(stage).key == resnet18_hybrid.record(stage).key
    assert resnet18_no_blocks.record("partition").key != resnet18_hybrid.record("partition").key


# --- (c) require_full_compilation ---------------------------------------------------------

def test_require_full_compilation_with_a_fallback_fails(resnet18_cache, resnet18_hybrid, tmp_path):
    from pipeline.tracking import Tracker

    before = cache_entries(resnet18_cache, "partition")
    runner, _, run_dir = make_runner(tmp_path, *RESNET18, *ORT_1_THREAD, "compile.torch_executed_ops=[aten.add.Tensor]",
                                     "compile.require_full_compilation=true", cache=resnet18_cache)
    with pytest.raises(CompileError, match=re.escape("require_full_compilation=true but 8 ops would stay")) as info:
        runner.run(Tracker(runner.config["tracking"]))
    assert "aten.add.Tensor x8" in str(info.value) and info.value.exit_code == 3
    assert cache_entries(resnet18_cache, "partition") == before
    assert half_written(resnet18_cache) == []
    assert not (run_dir / "partition").exists()
    (run,) = mlflow_runs(mlflow_client(tmp_path))
    assert run.info.status == "FAILED" and "require_full_compilation" in run.data.tags["error"]
    assert run.data.tags["cache.export"] == "hit" and run.data.tags["cache.lower"] == "hit"


# --- (d) a custom op no target supports ---------------------------------------------------

def test_custom_op_stays_in_pytorch_between_two_engines(custom_op_job):
    job = custom_op_job
    report = check_accounting(job)
    assert [s["kind"] for s in report["segments"]] == ["accelerated", "torch", "accelerated"]
    assert report["segments"][1]["ops"] == {"pipeline_zoo.soft_clip.default": 1}
    assert job.result.metrics["num_accelerated_segments"] == 2
    kept = report["kept_in_torch"]
    assert list(kept) == ["pipeline_zoo.soft_clip.default"]
    (reason,) = kept["pipeline_zoo.soft_clip.default"]["reasons"]
    assert reason.startswith("unsupported by onnxruntime")
    assert_passed(job)
    assert json.loads((job.run_dir / "export" / "imports.json").read_text()) == ["pipeline.zoo"]


# --- (e) the eager target -----------------------------------------------------------------

def test_eager_target_accelerates_nothing(resnet18_eager):
    job = resnet18_eager
    report = check_accounting(job)
    assert job.result.target == "eager"
    assert job.result.metrics["num_accelerated_segments"] == 0
    assert [s["kind"] for s in report["segments"]] == ["torch"]
    for info in report["kept_in_torch"].values():
        assert all("eager" in reason for reason in info["reasons"])
    assert job.json("build/engines.json") == {"target": "eager", "settings": {"name": "eager", "device": "cpu"}, "segments": []}
    assert_passed(job)
    assert job.json("validate/report.json")["accuracy"]["rel_l2_err"] <= 1e-6  # the same PyTorch ops


# --- resolving op names -------------------------------------------------------------------

def test_resolve_ops():
    assert resolve_ops(["aten.add.Tensor"]) == {"aten.add.Tensor"}
    assert resolve_ops(["torch.ops.aten.relu.default"]) == {"aten.relu.default"}
    relu = resolve_ops(["aten.relu"])  # a packet means every overload
    assert "aten.relu.default" in relu and all(o.startswith("aten.relu.") for o in relu)
    assert resolve_ops([]) == set()


@pytest.mark.parametrize("name, message", [
    ("aten.reluu.default", "not an operator"),
    ("aten.add.Tensorr", "has no overload 'Tensorr'"),
    ("relu", "not an operator"),
    ("nonamespace.relu.default", "not an operator"),
])
def test_resolve_ops_rejects_unknown_names(name, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_ops([name])


def test_stage_order():
    import stages

    assert tuple(spec.name for spec in stages.ORDER) == STAGES
