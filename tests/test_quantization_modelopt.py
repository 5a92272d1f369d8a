"""target=torch_tensorrt compile.precision=int8/fp8: Model Optimizer quantizes the module before export.

Torch-TensorRT's documented route: `mtq.quantize` with the job's calibration batches, then
torch.export inside modelopt's `export_torch_mode`, where every enabled quantizer becomes one
`tensorrt::quantize_op` node that Torch-TensorRT converts to Q/DQ layers. modelopt emits
that op only for CUDA tensors, so the export runs on the GPU (tests/test_gpu.py style skip);
the keys, refusals, the MAC count over quantize ops and the module half run everywhere
modelopt imports. The whole build needs torch_tensorrt (not installable here).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from testkit import REPO, clean_env, compose, run_job

from pipeline.quantize import torch_modelopt

NO_MODELOPT = torch_modelopt.unavailable()
needs_modelopt = pytest.mark.skipif(NO_MODELOPT is not None, reason=f"{NO_MODELOPT} (pip install -e '.[quant]')")


def configured(cfg, precision: str):
    from pipeline.targets.torch_tensorrt import TorchTensorRTTarget

    target = TorchTensorRTTarget(OmegaConf.to_container(cfg.target))
    target.configure({**OmegaConf.to_container(cfg.compile, enum_to_str=True), "precision": precision},
                     release=((2, 14), False))
    return target


def export_key(tmp_path, target_name: str, precision: str, *extra: str) -> str:
    """The export stage's cache key for this job (the target made as the runner makes it)."""
    import stages
    from pipeline import targets
    from pipeline.cache import StageCache

    cfg = compose(tmp_path, f"target={target_name}", f"compile.precision={precision}", *extra)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if target_name == "torch_tensorrt":
        target = configured(cfg, precision)
    else:
        target = targets.target_class(target_name)(OmegaConf.to_container(cfg.target))
    return StageCache(tmp_path / "cache").material(stages.BY_NAME["export"], config, target, tmp_path, {}).key


def test_export_reads_calibration_only_where_the_module_is_quantized(tmp_path):
    """Torch-TensorRT's int8 export holds the calibrated quantizers: calibration keys it; nowhere else."""
    more = ("calibration.num_samples=4",)
    assert export_key(tmp_path, "torch_tensorrt", "int8") != export_key(tmp_path, "torch_tensorrt", "int8", *more)
    excluded = ("quantize.exclude=[0]",)
    assert export_key(tmp_path, "torch_tensorrt", "fp8") != export_key(tmp_path, "torch_tensorrt", "fp8", *excluded)
    assert export_key(tmp_path, "torch_tensorrt", "fp32") == export_key(tmp_path, "torch_tensorrt", "fp32", *more)
    # Targets that quantize in build export the fp32 model whatever the calibration.
    assert export_key(tmp_path, "onnxruntime", "int8") == export_key(tmp_path, "onnxruntime", "int8", *more)
    assert export_key(tmp_path, "torch_tensorrt", "int8") != export_key(tmp_path, "torch_tensorrt", "fp32")


@needs_modelopt
@pytest.mark.parametrize(("change", "words"), [
    ("calibration.method=entropy", "calibrates with max"),
    ("calibration.per_channel=false", "per channel"),
    ("quantize.op_types=[Conv]", "ONNX op types"),
])
def test_settings_the_module_route_cannot_serve_are_refused(tmp_path, change, words):
    from pipeline.targets.torch_tensorrt import TorchTensorRTTarget

    config = OmegaConf.to_container(compose(tmp_path, "target=torch_tensorrt", "compile.precision=int8", change),
                                    resolve=True, enum_to_str=True)
    why, fix = TorchTensorRTTarget(config["target"]).quantizer_refusal(config, "int8")
    assert words in why and fix
    ok = OmegaConf.to_container(compose(tmp_path, "target=torch_tensorrt", "compile.precision=int8"), resolve=True,
                                enum_to_str=True)
    target = TorchTensorRTTarget(ok["target"])
    assert target.quantizer_refusal(ok, "int8") is None and target.quantizer_refusal(ok, "fp8") is None


def test_releases_before_strongly_typed_networks_enable_the_quantized_kernels(tmp_path):
    """Before 2.13 Torch-TensorRT takes the kernel precisions from enabled_precisions: int8/fp8 must be there."""
    from pipeline.targets.torch_tensorrt import translate

    cfg = compose(tmp_path, "target=torch_tensorrt")
    for precision, dtype in (("int8", "int8"), ("fp8", "float8_e4m3fn")):
        compile_cfg = {**OmegaConf.to_container(cfg.compile, enum_to_str=True), "precision": precision}
        out = translate(compile_cfg, OmegaConf.to_container(cfg.target), (2, 12))
        assert out["enabled_precisions"] == sorted({"float32", dtype})
        assert "enabled_precisions" not in translate(compile_cfg, OmegaConf.to_container(cfg.target), (2, 14))


def test_tensorrt_quantizer_choice_follows_what_modelopt_serves(tmp_path):
    """auto takes ORT's route for percentile or per-tensor weights; an explicit modelopt with them is refused."""
    from pipeline.quantize import tensorrt_qdq
    from pipeline.targets.tensorrt import TensorRTTarget

    assert tensorrt_qdq.serves("minmax", True) and tensorrt_qdq.serves("entropy", True)
    assert not tensorrt_qdq.serves("percentile", True) and not tensorrt_qdq.serves("minmax", False)

    def config(*extra):
        return OmegaConf.to_container(compose(tmp_path, "target=tensorrt", "compile.precision=int8", *extra),
                                      resolve=True, enum_to_str=True)

    def refusal(*extra):
        job = config(*extra)
        return TensorRTTarget(job["target"]).quantizer_refusal(job, "int8")

    assert refusal("calibration.method=percentile") is None  # auto: ORT's route
    refused = refusal("target.quantizer=modelopt", "calibration.method=percentile")
    onnx_route = tensorrt_qdq.modelopt_available()
    expected = "modelopt calibrates with minmax or entropy" if onnx_route else "target.quantizer=modelopt but"
    assert refused and expected in refused[0] and "target.quantizer" in refused[1]


class QuantizedOps(torch.nn.Module):
    """A conv whose input and weight go through modelopt's int8 quantize op, then a plain linear."""

    def __init__(self, exponent_bits: int = 0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)
        self.bits = exponent_bits

    def forward(self, x):
        q = torch.ops.tensorrt.quantize_op
        amax = torch.tensor(4.0)
        x = q(x, amax, 8, self.bits, False, True)
        w = q(self.conv.weight, self.conv.weight.abs().amax(), 8, self.bits, False, True)
        y = torch.nn.functional.conv2d(x, w, self.conv.bias).mean((2, 3))
        return self.fc(y)


@needs_modelopt
def test_mac_fractions_count_layers_fed_by_quantize_ops():
    """A real exported graph with modelopt's op: the conv is int8 (or fp8 by its exponent bits), the fc is not."""
    import modelopt.torch.quantization  # noqa: F401  (registers tensorrt::quantize_op)

    x = torch.randn(1, 3, 10, 10)
    program = torch.export.export(QuantizedOps().eval(), (x,), strict=False)
    found = torch_modelopt.fractions(program.module(), "int8")
    conv_macs, fc_macs = 8 * 8 * 8 * 3 * 9, 8 * 4
    assert (found["compute_ops"], found["int8_ops"]) == (2, 1)
    assert found["macs"] == conv_macs + fc_macs and found["int8_macs"] == conv_macs
    assert torch_modelopt.fractions(program.module(), "fp8")["fp8_ops"] == 0
    fp8 = torch.export.export(QuantizedOps(exponent_bits=4).eval(), (x,), strict=False)
    assert torch_modelopt.fractions(fp8.module(), "fp8")["fp8_ops"] == 1


@needs_modelopt
def test_modelopt_fake_quantizes_a_module_on_cpu():
    """The torch half of Torch-TensorRT's int8 route: calibrated fake-quantizers change the outputs a little,
    and the quantizers of an excluded module stay off."""
    import quantkit

    from pipeline.shapes import Sample

    model = quantkit.outlier_net(scale=1.0).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [Sample((torch.randn(1, 3, 64, 64, generator=gen),), {}, {}) for _ in range(4)]
    x = torch.randn(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref = model(x)
        quantized = torch_modelopt.quantize_module(model, batches, "int8", exclude=["conv2"])
        got = quantized(x)
    assert not torch.equal(got, ref)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99
    record = torch_modelopt.record(quantized, "int8")
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize.exclude names conv9, which the model has no module for"):
        torch_modelopt.quantize_module(quantkit.outlier_net(scale=1.0).eval(), batches, "int8", exclude=["conv9"])
    assert record["recipe"] == "INT8_DEFAULT_CFG" and record["quantizers_enabled"] > 0
    assert not quantized.conv2.input_quantizer.is_enabled and quantized.conv3.input_quantizer.is_enabled


def export_stage(tmp_path, precision: str, *extra: str):
    """The export stage run as the runner runs it (its visible config), for target=torch_tensorrt."""
    from rich.console import Console

    import stages
    from pipeline import calibration
    from pipeline.cache import select
    from pipeline.stage import StageContext

    cfg = compose(tmp_path, "target=torch_tensorrt", f"compile.precision={precision}", "+model.kwargs.width=32",
                  "calibration.num_samples=4", *extra)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    calibration.check(config)
    target, spec = configured(cfg, precision), stages.BY_NAME["export"]
    visible = OmegaConf.create(select(config, spec.reads_for(config, target) + spec.labels))
    OmegaConf.set_readonly(visible, True)
    out = tmp_path / "export"
    out.mkdir()
    metrics = spec.run(StageContext(visible, target, {}, out, Console(quiet=True)))
    return out, metrics


@needs_modelopt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="modelopt emits tensorrt::quantize_op for CUDA tensors only")
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_export_traces_modelopt_quantize_ops_on_the_gpu(tmp_path, precision):
    """Export quantizes tiny_cnn for Torch-TensorRT: its program feeds every conv through quantize ops,
    records the quantization, and reloads in a fresh process (which imports modelopt for the op)."""
    import json

    from pipeline import programs

    out, _ = export_stage(tmp_path, precision)
    program = programs.load(out)
    found = torch_modelopt.fractions(program.module(), precision)
    assert found[f"{precision}_ops"] >= 2 and found[f"{precision}_mac_fraction"] > 0.8
    assert "modelopt.torch.quantization" in programs.imports_of(out)
    meta = json.loads((out / "model.json").read_text())["quantized_module"]
    assert meta["precision"] == precision and meta["quantizers_enabled"] > 0 and meta["num_batches"] == 4
    code = ("import sys; from pipeline import programs; p = programs.load(__import__('pathlib').Path(sys.argv[1]));"
            "print(sum(str(n.target).startswith('tensorrt.quantize_op') for n in p.graph.nodes"
            " if n.op == 'call_function'))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=REPO,
                          env=clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) >= 4


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None,
                    reason="torch_tensorrt cannot be installed here (no NVIDIA wheels): its modelopt build is untested")
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_torch_tensorrt_quantized_build(tmp_path, precision):
    job = run_job(tmp_path, "target=torch_tensorrt", f"compile.precision={precision}", "+model.kwargs.width=32",
                  "tracking.enabled=false")
    assert precision in job.result.tags["precision.achieved"]
    assert job.result.metrics[f"{precision}_mac_fraction"] > 0.8
