"""compile.precision=fp8: TensorRT-RTX builds a calibrated FP8 (E4M3) QDQ graph on this CPU; the other
targets but torch_tensorrt (tests/test_quantization_modelopt.py) refuse it in one line before any stage;
the build key records nvidia-modelopt.
"""

from __future__ import annotations

import importlib.util

import pytest
from testkit import STAGES, cache_entries, compose, make_runner, run_cli

from pipeline.errors import ConfigError

NO_RTX = importlib.util.find_spec("tensorrt_rtx") is None
FP8_RTX = ("target=tensorrt", "target.library=tensorrt_rtx", "compile.precision=fp8")


@pytest.mark.skipif(NO_RTX, reason="tensorrt-rtx is not installed (pip install tensorrt-rtx): no FP8 build to check")
@pytest.mark.parametrize("tool", ["modelopt", "onnxruntime"])
def test_tensorrt_rtx_fp8_engine_has_fp8_tensors(tmp_path, tool):
    """Built ahead of time on this CPU, for compute capabilities 8.9 and 12.0: FP8 tensors between Q/DQ layers."""
    from testkit import run_job

    from pipeline.quantize.tensorrt_qdq import modelopt_available

    if tool == "modelopt" and not modelopt_available():
        pytest.skip("modelopt.onnx.quantization does not import (pip install -e '.[quant]')")
    job = run_job(tmp_path, *FP8_RTX, "+model.kwargs.width=32", f"target.quantizer={tool}", "tracking.enabled=false")
    assert job.result.status == "FINISHED"
    (segment,) = job.json("build/engines.json")["segments"]
    network = job.json(f"build/{segment['network']}")
    dtypes = [t["dtype"] for layer in network["layers"] for t in layer["inputs"] + layer["outputs"] if t]
    # modelopt keeps the 3-channel stem conv out of FP8 (its rule for small convs): the rest is FP8.
    assert network["strongly_typed"] and dtypes.count("float8_e4m3fn") >= 4
    assert {"QUANTIZE", "DEQUANTIZE"} <= {layer["type"].rpartition(".")[2] for layer in network["layers"]}
    assert segment["precision"] == ["float32", "float8_e4m3fn"] and segment["compute_capabilities"] == ["8.9", "12.0"]
    assert segment["fp8"]["fp8_mac_fraction"] > 0.8 and "int8" not in segment
    assert segment["quantizer"].startswith("modelopt" if tool == "modelopt" else "onnxruntime.quantization")
    assert job.result.tags["precision.achieved"] == "fp32+fp8"
    assert job.result.metrics["fp8_mac_fraction"] > 0.8 and "int8_mac_fraction" not in job.result.metrics
    assert job.json("validate/report.json")["precision_achieved"] == "fp32+fp8"


def test_fp8_is_refused_by_onnxruntime_in_one_line_and_nothing_is_written(tmp_path):
    proc = run_cli(tmp_path, "target=onnxruntime", "compile.precision=fp8", "tracking.enabled=false",
                   cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in text
    assert "target onnxruntime cannot build compile.precision=fp8" in lines[0] and "no FP8 convolution" in lines[0]
    assert "use target=tensorrt" in lines[0]
    assert all(cache_entries(tmp_path / "cache", stage) == [] for stage in STAGES)
    assert not any((tmp_path / "run" / stage).exists() for stage in STAGES)


REFUSED = {
    "eager": (("target=eager",), "target eager cannot build compile.precision=fp8: it has no fp8 quantizer"),
    # torchao's fp8 route needs a CUDA GPU of compute capability 8.9+ (tests/test_gpu.py builds it on one).
    "inductor": (("target=inductor",), "target inductor cannot build compile.precision=fp8 here: its fp8 route "
                 "runs on a CUDA GPU of compute capability 8.9 or newer"),
    "inductor_cpu": (("target=inductor", "target.device=cpu"), "target inductor cannot build "
                     "compile.precision=fp8 here: its fp8 route runs on a CUDA GPU of compute capability 8.9"),
    "old_gpus": ((*FP8_RTX, "target.compute_capabilities=[8.6,8.0]"),
                 "FP8 needs compute capability 8.9 or newer, and target.compute_capabilities has 8.6, 8.0"),
    "entropy": ((*FP8_RTX, "calibration.method=entropy"), "calibration.method=entropy is an int8 histogram recipe"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_fp8_refusals_are_one_line_before_any_stage(tmp_path, name):
    extra, needle = REFUSED[name]
    if name in ("old_gpus", "entropy") and NO_RTX:
        pytest.skip("tensorrt-rtx is not installed: target=tensorrt is unavailable before the fp8 check")
    runner, console, _ = make_runner(tmp_path / "out", "compile.precision=fp8", *extra, "tracking.enabled=false",
                                     cache=tmp_path / "cache")
    from pipeline.tracking import Tracker

    try:
        runner.run(Tracker(runner.config["tracking"]))
    except ConfigError as err:
        line = err.one_line()
    else:
        pytest.fail("fp8 was not refused")
    assert needle in line and " Fix: " in line and "\n" not in line
    assert all(cache_entries(tmp_path / "cache", stage) == [] for stage in STAGES)


def test_tensorrt_build_key_records_nvidia_modelopt(tmp_path):
    """modelopt makes the QDQ graphs where it imports: its version (or its absence) is part of build's key."""
    from omegaconf import OmegaConf

    import stages
    from pipeline import env, targets
    from pipeline.cache import environment

    cfg = compose(tmp_path, "target=tensorrt", "compile.precision=fp8")
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert "nvidia-modelopt" in targets.target_class("tensorrt").libraries
    if NO_RTX:
        pytest.skip("tensorrt-rtx is not installed: the tensorrt target cannot be made here")
    target = targets.make("tensorrt", config["target"])
    assert "nvidia-modelopt" in target.libraries_for(targets.BUILDING)
    spec = stages.BY_NAME["build"]
    assert spec.asks == targets.BUILDING
    keyed = environment(spec.libraries + target.libraries_for(spec.asks))["libraries"]  # what build's key holds
    version = env.library_version("nvidia-modelopt")
    assert keyed.get("nvidia-modelopt") == version and "tensorrt_rtx" in keyed
    assert (version is None) == (importlib.util.find_spec("modelopt") is None)
    assert env.library_version("no-such-distribution-xyz") is None


@pytest.mark.skipif(NO_RTX, reason="tensorrt-rtx is not installed: target=tensorrt is unavailable")
def test_asking_fp8_and_getting_none_fails(tmp_path):
    """Nothing accelerated (every block too small): no engine computes in fp8, and the job says so."""
    from testkit import run_job

    from pipeline.errors import CompileError

    with pytest.raises(CompileError, match="asked for fp8 but no engine reports fp8"):
        run_job(tmp_path, *FP8_RTX, "compile.min_block_size=100000", "tracking.enabled=false")
