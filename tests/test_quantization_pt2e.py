"""target=inductor compile.precision=int8: PT2E with torchao's X86InductorQuantizer, on this CPU.

A real `python -m pipeline` job on the tiny CNN: calibrated with the segment's real inputs,
converted, compiled by AOTInductor with freezing into oneDNN int8 kernels, checked by the
accuracy gate and by validate. Settings the route cannot serve are one line before any stage.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from testkit import STAGES, cache_entries, compose, make_runner, run_cli

from pipeline.errors import ConfigError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                reason="torchao is not installed (pip install -e '.[quant]'): "
                                       "the inductor int8 route (PT2E) is untested")

INT8 = ("target=inductor", "target.device=cpu", "compile.precision=int8", "tracking.enabled=false")


@pytest.fixture(scope="module")
def pt2e_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pt2e")
    done = run_cli(tmp, *INT8)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, tmp / "run", done.stdout


def read(run_dir, rel: str):
    return json.loads((run_dir / rel).read_text())


def test_inductor_int8_runs_in_int8_and_passes_the_gate(pt2e_job):
    _, run_dir, log = pt2e_job
    (segment,) = read(run_dir, "build/engines.json")["segments"]
    assert segment["precision"] == ["int8"] and segment["artifact"] == "aoti"
    assert segment["int8"]["int8_kernels"] >= 3 and segment["int8"]["float_kernels"] == 0  # 2 qconv + 1 qlinear
    assert segment["int8"]["int8_op_fraction"] == 1.0 and segment["int8"]["int8_mac_fraction"] == 1.0
    assert "X86InductorQuantizer" in segment["quantizer"] and segment["observer"] == "MinMaxObserver"
    assert (run_dir / "build" / segment["quantized_program"]).is_file()
    assert segment["quantize"] == {"mode": "static", "method": "minmax", "per_channel": True, "num_batches": 16,
                                   "excluded": [], "op_types": [], "smooth_alpha": None}
    report = read(run_dir, "build/quantization.json")
    assert report["passed"] and len(report["rounds"]) == 1 and report["rounds"][0]["int8_mac_fraction"] == 1.0
    assert report["calibration"]["method"] == "minmax" and report["calibration"]["per_channel"] is True
    assert report["calibration"]["num_samples"] == 16 and len(report["calibration"]["digest"]) == 64
    validated = read(run_dir, "validate/report.json")
    assert validated["passed"] and validated["precision_achieved"] == "int8"
    assert validated["accuracy"]["cosine_similarity"] >= 0.999
    assert "calibration: random, 16 batches, method minmax, per_channel=True" in log


def test_inductor_int8_engine_loads_and_agrees_with_fp32(pt2e_job):
    import torch

    import pipeline
    from pipeline.models import build_model

    outputs, run_dir, _ = pt2e_job
    module = pipeline.load(run_dir, trusted=True)
    model = build_model(compose(outputs).model)
    x = torch.randn(3, 1, 3, 64, 64, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        got, ref = torch.cat([module(b) for b in x]), torch.cat([model(b) for b in x])
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999
    assert not torch.equal(got, ref)  # quantized: close, not identical


def cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


REFUSED = {
    # On CUDA int8 is torchao's route (pipeline.quantize.torchao_gpu), whose modes are dynamic and weight_only.
    "cuda": (("target.device=cuda",), "its CUDA int8 route (torchao) has no quantize.mode=static"),
    "compile_cache": (("target.artifact=compile_cache",), "not target.artifact=compile_cache"),
    "per_tensor": (("calibration.per_channel=false",), "per-channel weights only"),
    "percentile": (("calibration.method=percentile",), "torchao has no percentile observer"),
    "op_types": (("quantize.op_types=[Conv]",), "quantize.op_types names ONNX op types"),
    "no_freezing": (("target.freezing=false",), "its int8 route needs Inductor's freezing"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_settings_pt2e_cannot_serve_are_one_line_before_any_stage(tmp_path, name):
    from pipeline.tracking import Tracker

    extra, needle = REFUSED[name]
    overrides = [o for o in INT8 if not (name == "cuda" and o.startswith("target.device"))]
    if name == "cuda" and not cuda_here():
        # Without a GPU the job refuses target.device=cuda first (tests/pipeline/test_settings_walk.py);
        # the CUDA route's own refusal is what the target answers with CUDA as its device.
        from omegaconf import OmegaConf

        from pipeline.targets.inductor import InductorTarget

        config = OmegaConf.to_container(compose(tmp_path, *overrides, *extra), resolve=True, enum_to_str=True)
        why, fix = InductorTarget(config["target"]).quantizer_refusal(config, "int8")
        assert needle in why and fix
        return
    runner, console, _ = make_runner(tmp_path / "out", *overrides, *extra, cache=tmp_path / "cache")
    with pytest.raises(ConfigError) as caught:
        runner.run(Tracker(runner.config["tracking"]))
    line = caught.value.one_line()
    assert "target inductor cannot build compile.precision=int8 here" in line and needle in line
    assert " Fix: " in line and "\n" not in line
    assert [row for row in console.export_text().splitlines() if row.startswith("error:")] == ["error: " + line]
    assert all(cache_entries(tmp_path / "cache", stage) == [] for stage in STAGES)



def test_module_paths_in_quantize_exclude_are_checked_and_kept(tmp_path):
    """On the PT2E route quantize.exclude takes module paths: a real one stays fp32, an unknown one is refused."""
    from testkit import run_job

    outlier = ("model._target_=quantkit.outlier_net", "model.name=outlier", *INT8, "quantize.max_rounds=0")
    job = run_job(tmp_path / "kept", *outlier, "quantize.exclude=[accel_0/conv2]", cache=tmp_path / "cache")
    (segment,) = job.json("build/engines.json")["segments"]
    assert segment["quantize"]["excluded"] == ["conv2"] and segment["int8"]["fp32_layers"]
    assert job.json("validate/report.json")["passed"]  # conv2 in fp32 is what outlier_net needs
    with pytest.raises(ConfigError) as caught:
        run_job(tmp_path / "typo", *outlier, "quantize.exclude=[accel_0/conv9]", cache=tmp_path / "cache")
    assert "quantize.exclude names accel_0/conv9, which no segment has" in caught.value.one_line()
    assert "accel_0/conv1" in caught.value.one_line()
