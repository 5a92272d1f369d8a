"""validate.throughput: the batch with the most throughput under a p99 budget, searched on one engine.

The search's logic on known numbers, then a real job on the CPU (tiny_cnn, dynamic batch,
ONNX Runtime) whose curve lands in the report, the plot, the console and MLflow with the
batch as step. The same code runs on a GPU (bench/gpu.py's table for ResNet-50).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from testkit import mlflow_client, mlflow_runs, run_job

from pipeline import throughput
from pipeline.timing import LatencyStats

DYNAMIC = OmegaConf.create({"tensors": [{"name": "x", "shape": ["batch", 3, 32, 32]}],
                            "dims": {"batch": {"min": 1, "opt": 2, "max": 8}}})


def test_batches_are_powers_of_two_up_to_the_max_or_those_asked_for():
    assert throughput.batches(1, 256, []) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert throughput.batches(3, 20, []) == [3, 4, 8, 16, 20]
    assert throughput.batches(1, 8, [8, 2, 64, 2]) == [2, 8]  # outside the dim's range: not timed


def test_batch_dim_is_the_first_inputs_leading_dynamic_dim():
    assert throughput.batch_dim(DYNAMIC) == "batch"
    static = OmegaConf.create({"tensors": [{"name": "x", "shape": [1, 3, 32, 32]}], "dims": {}})
    assert throughput.batch_dim(static) is None
    fixed = OmegaConf.create({"tensors": [{"name": "x", "shape": ["b", 3]}], "dims": {"b": {"min": 4, "max": 4}}})
    assert throughput.batch_dim(fixed) is None


def fake(latency_ms: dict[int, float]):
    """A time_at whose calls take latency_ms[batch] each (a 10% tail), and the batches it was asked for."""
    asked = []

    def time_at(batch: int) -> LatencyStats:
        asked.append(batch)
        if latency_ms[batch] < 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ms = [latency_ms[batch]] * 90 + [latency_ms[batch] * 1.5] * 10
        return LatencyStats.from_samples(ms, batch_size=batch)
    return time_at, asked


def test_search_picks_the_fastest_batch_within_the_budget_and_stops_past_it():
    time_at, asked = fake({1: 1.0, 2: 1.2, 4: 2.0, 8: 3.0, 16: 12.0, 32: 30.0})
    found = throughput.search(time_at, [1, 2, 4, 8, 16, 32], budget_ms=11.0)
    assert asked == [1, 2, 4, 8, 16]  # 16's p99 (18 ms) passed the budget: 32 is not timed
    assert found["chosen_batch"] == 8 and found["chosen"]["p99_ms"] <= 11.0
    assert [p["batch"] for p in found["curve"]] == [1, 2, 4, 8, 16]
    assert "batch 16's p99" in found["stopped"]
    text = throughput.table(found)
    assert "<- chosen" in text.splitlines()[5] and "over budget" in text and "chosen batch: 8" in text


def test_search_stops_at_out_of_memory_and_may_choose_nothing():
    time_at, _ = fake({1: 1.0, 2: 1.5, 4: -1})
    found = throughput.search(time_at, [1, 2, 4, 8], budget_ms=100.0)
    assert found["chosen_batch"] == 2 and found["stopped"] == "batch 4 ran out of memory"
    time_at, _ = fake({1: 50.0})
    found = throughput.search(time_at, [1], budget_ms=10.0)
    assert found["chosen_batch"] is None and "none" in throughput.table(found)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    return run_job(out, "model=tiny_cnn", "input=image_dynamic_batch", "target=onnxruntime", "validate=quick",
                   "input.tensors=[{name: x, shape: [batch, 3, 32, 32]}]", "input.dims.batch.max=8",
                   "validate.throughput.enabled=true", "validate.throughput.iterations=20",
                   "validate.throughput.p99_budget_ms=1000")


def test_a_job_searches_on_its_own_engine_and_records_the_curve(searched):
    assert searched.result.status == "FINISHED", searched.log[-3000:]
    found = searched.json("validate/report.json")["throughput"]
    assert [p["batch"] for p in found["curve"]] == [1, 2, 4, 8]
    assert all(p["throughput_per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] for p in found["curve"])
    assert found["chosen_batch"] in (1, 2, 4, 8) and found["stopped"] == "every batch was timed"
    assert (searched.run_dir / "validate" / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert "throughput vs batch" in searched.log and f"chosen batch: {found['chosen_batch']}" in searched.log
    assert searched.result.metrics["throughput.chosen_batch"] == found["chosen_batch"]
    client = mlflow_client(searched.outputs)
    (run,) = mlflow_runs(client)
    history = client.get_metric_history(run.info.run_id, "throughput_curve.throughput_per_s")
    assert sorted(m.step for m in history) == [1, 2, 4, 8]


def test_a_static_input_is_not_searched_and_says_why(tmp_path):
    job = run_job(tmp_path, "model=tiny_cnn", "target=eager", "validate=quick", "tracking.enabled=false",
                  "input.tensors=[{name: x, shape: [2, 3, 32, 32]}]", "validate.throughput.enabled=true")
    assert job.result.status == "FINISHED", job.log[-3000:]
    assert job.json("validate/report.json")["throughput"] is None
    assert "validate.throughput needs a dynamic batch" in job.log
