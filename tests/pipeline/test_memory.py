"""Memory: estimated before any stage and refused in one line, peaks recorded per stage, OOM told as such."""

from __future__ import annotations

import json

import pytest
import torch
from testkit import compose, make_runner

from pipeline import memory, peaks
from pipeline.errors import ConfigError
from pipeline.worker import Request, crashed


def test_activations_are_measured_once_per_storage_and_scale_with_the_batch(tmp_path):
    cfg = compose(tmp_path, "model=tiny_cnn", "input.tensors=[{name: x, shape: [8, 3, 32, 32]}]")
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    one = memory.estimate({**config, "input": {**config["input"], "tensors": [{**config["input"]["tensors"][0],
                                                                                "shape": [1, 3, 32, 32]}]}}, "cpu")
    eight = memory.estimate(config, "cpu")
    assert (one["batch"], eight["batch"]) == (1, 8)
    assert one["host"]["activations"] > 0 and eight["host"]["activations"] == 8 * one["host"]["activations"]
    assert eight["host"]["weights"] == one["host"]["weights"] > 0
    # The first conv's output alone (16 channels at 32x32, fp32) is live at the peak.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU())
    sample = memory.at_batch_one(cfg.input, {})
    assert memory.activation_peak_bytes(model, sample) >= 16 * 32 * 32 * 4


@pytest.mark.parametrize("target", ["pipeline.zoo.tiny_cnn", "torchvision.models.resnet18",
                                    "testkit.value_branch_net"])
def test_the_meta_trace_measures_what_the_cpu_measures(tmp_path, target):
    """Activations traced on the meta device match the real forward's on the CPU; a model whose
    Python branches on values cannot run on meta, and is measured on the CPU instead."""
    from omegaconf import OmegaConf

    from pipeline.models import build_model

    cfg = compose(tmp_path, f"model._target_={target}", "input.tensors=[{name: x, shape: [2, 3, 32, 32]}]")
    one = memory.at_batch_one(cfg.input, {})
    on_cpu = memory.activation_peak_bytes(build_model(cfg.model), one)
    traced = memory.activations_on_meta(build_model(cfg.model), one)
    weights, estimated = memory.weigh(OmegaConf.to_container(cfg.model, resolve=True), one)
    assert weights == memory.model_bytes(build_model(cfg.model)) > 0
    if target.startswith("testkit."):
        assert traced is None and estimated == on_cpu >= 8 * 32 * 32 * 4
    else:
        assert traced == estimated == pytest.approx(on_cpu, rel=0.01)


def test_a_job_that_cannot_fit_is_refused_before_any_stage(tmp_path):
    from pipeline.tracking import Tracker

    runner, console, run_dir = make_runner(tmp_path, "model=tiny_cnn", "target=eager", "tracking.enabled=false",
                                           "input.tensors=[{name: x, shape: [2000000, 3, 224, 224]}]")
    with pytest.raises(ConfigError):
        runner.run(Tracker(runner.config["tracking"]))
    result = json.loads((run_dir / "run.json").read_text())
    assert result["status"] == "FAILED" and result["stages"] == [] and result["tags"]["failed_stage"] == "memory check"
    error = result["error"]
    assert error.startswith("the job needs about ") and "GB of host memory at batch 2000000" in error
    assert "\n" not in error and "is available" in error
    assert "error: the job needs about" in console.export_text()


def test_stages_record_their_peaks(tiny_job):
    m = tiny_job.result.metrics
    for stage in ("export", "build", "validate"):
        assert m[f"{stage}.host_peak_rss_mb"] > 10
    assert m["memory.host_needed_gb"] > 0


def test_a_process_killed_by_the_oom_killer_is_out_of_host_memory(tmp_path):
    now = peaks.oom_kills()
    if now is None:
        pytest.skip("this kernel exposes no oom_kill counter")
    request = Request(stage="validate", config={}, target="eager", settings={}, inputs={}, out=str(tmp_path / "x"),
                      job_pid=0)
    assert "ran out of host memory" in crashed(request, -9, now - 1).problem  # the counter rose meanwhile
    assert "native code in eager" in crashed(request, -9, now).problem  # it did not: another SIGKILL
