"""The tensorrt target with the real TensorRT-RTX: ONNX parsing and engine builds on the CPU.

TensorRT-RTX builds engines ahead of time without a GPU, so everything up to the plan
file runs here; running an engine needs a supported GPU, which these tests expect not
to have (the checks of "cannot run here" skip where a CUDA GPU is present).
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from testkit import RESNET18, artifact_paths, compose, mlflow_client, mlflow_runs, run_job

from pipeline import targets
from pipeline.config import CompileConfig
from pipeline.errors import CompileError, ConfigError, TargetUnavailable
from pipeline.targets.tensorrt import TensorRTTarget
from stages.validate import achieved_precision

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")


class Segment(torch.nn.Module):
    """Stands for a fused segment: returns a tuple, as the partition's submodules do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))

    def forward(self, x):
        return (self.body(x),)


def compile_cfg(**changes):
    """The compile section as stages see it: the runner's resolved values (enum names as strings)."""
    cfg = OmegaConf.structured(CompileConfig)
    for key, value in changes.items():
        cfg[key] = value
    return OmegaConf.create(OmegaConf.to_container(cfg, enum_to_str=True))


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    """The target settings as conf/target/tensorrt.yaml composes them."""
    cfg = compose(tmp_path_factory.mktemp("conf"), "target=tensorrt")
    return OmegaConf.to_container(cfg.target)


def converted(tmp_path_factory, settings, dtype):
    out = tmp_path_factory.mktemp(f"convert-{dtype}")
    module = Segment().eval().to(dtype)
    args = (torch.randn(1, 3, 16, 16, dtype=dtype),)
    target = TensorRTTarget(settings)
    return target, target.convert("accel_0", module, args, out, compile_cfg()), out


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, settings):
    return converted(tmp_path_factory, settings, torch.float32)


@pytest.fixture(scope="module")
def fp16(tmp_path_factory, settings):
    return converted(tmp_path_factory, settings, torch.float16)


def test_config_composes_and_registers(settings):
    assert settings == {"name": "tensorrt", "library": "auto", "timing_cache": None,
                        "compute_capabilities": [], "opset": None, "quantizer": "auto"}
    assert targets.target_class("tensorrt") is TensorRTTarget
    assert TensorRTTarget.unavailable_reason() is None
    assert targets.make("tensorrt", settings).library in ("tensorrt", "tensorrt_rtx")


def test_convert_records_the_parser_verdict(fp32):
    _, segment, out = fp32
    assert (out / segment["onnx"]).is_file()
    support = segment["parser_support"]
    assert support["supported"] and support["unsupported_nodes"] == []
    assert support["subgraphs"] and all(s["supported"] for s in support["subgraphs"])
    assert sum(s["num_nodes"] for s in support["subgraphs"]) == support["num_nodes"] > 0


def test_fp32_build_writes_plan_and_network(fp32, tmp_path):
    target, segment, convert_dir = fp32
    built = target.build(segment, convert_dir, tmp_path, compile_cfg())
    assert (tmp_path / built["engine"]).stat().st_size > 0
    assert built["library"] == target.library == "tensorrt_rtx"
    assert built["library_version"] == trt.__version__
    assert built["precision"] == ["float32"]
    assert built["inputs"] == segment["inputs"] and built["input_names"] == ["x"]
    network = json.loads((tmp_path / built["network"]).read_text())
    assert network["strongly_typed"] and network["inputs"][0]["shape"] == [1, 3, 16, 16]
    types = {layer["type"] for layer in network["layers"]}
    assert {"LayerType.CONVOLUTION", "LayerType.MATRIX_MULTIPLY"} <= types
    for layer in network["layers"]:
        assert layer["name"] and layer["precision"] == "float32"
        assert all(t["dtype"] == "float32" and isinstance(t["shape"], list) for t in layer["outputs"])
    assert built["num_layers"] == len(network["layers"])
    assert built["layers"] is None  # the engine inspector needs a GPU the engine runs on


def test_fp16_graph_builds_an_fp16_network(fp16, tmp_path):
    target, segment, convert_dir = fp16
    built = target.build(segment, convert_dir, tmp_path, compile_cfg(precision="fp16"))
    assert "float16" in built["precision"] and "float32" not in built["precision"]
    network = json.loads((tmp_path / built["network"]).read_text())
    conv = next(layer for layer in network["layers"] if layer["type"] == "LayerType.CONVOLUTION")
    assert conv["precision"] == "float16" and conv["outputs"][0]["dtype"] == "float16"


def test_builder_settings_and_compute_capabilities(fp32, settings, tmp_path):
    _, segment, convert_dir = fp32
    target = TensorRTTarget({**settings, "library": "tensorrt_rtx", "compute_capabilities": ["8.6", "12.0"]})
    built = target.build(segment, convert_dir, tmp_path,
                         compile_cfg(optimization_level=0, workspace_size=1 << 26))
    assert (tmp_path / built["engine"]).stat().st_size > 0
    hopper = TensorRTTarget({**settings, "compute_capabilities": ["9.0"]})
    with pytest.raises(ConfigError, match="9.0"):
        hopper.build(segment, convert_dir, tmp_path, compile_cfg())


def test_parser_rejection_names_the_op_and_the_fix(settings, tmp_path):
    from onnx import TensorProto, helper, save

    unique = helper.make_node("Unique", ["r"], ["u"], name="node_unique")
    unique.metadata_props.add(key="pkg.torch.onnx.fx_node",
                              value="%u = call_function[target=torch.ops.aten._unique2.default](args = (%r,))")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="node_relu"), unique],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, [None])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "bad.onnx"))
    target = TensorRTTarget(settings)

    support = target.parser_support(tmp_path / "bad.onnx")
    assert not support["supported"]
    assert [(n["node"], n["op_type"], n["aten_op"]) for n in support["unsupported_nodes"]] == [
        ("node_unique", "Unique", "aten._unique2.default")]

    segment = {"name": "accel_0", "onnx": "bad.onnx", "inputs": [{"shape": [4], "dtype": "float32"}]}
    with pytest.raises(CompileError) as err:
        target.build(segment, tmp_path, tmp_path, compile_cfg())
    line = err.value.one_line()
    assert "ONNX op Unique" in line and "add aten._unique2.default to compile.torch_executed_ops" in line
    assert "\n" not in line


def test_settings_the_library_cannot_honour_are_rejected(settings):
    with pytest.raises(ConfigError, match="timing_cache") as err:
        TensorRTTarget({**settings, "library": "tensorrt_rtx", "timing_cache": "trt.cache"})
    assert "TensorRT-RTX" in err.value.one_line()
    # A library outside target.library's choices is refused by the Settings schema before any stage
    # (tests/pipeline/test_settings_walk.py walks every field).


@no_gpu
def test_engines_cannot_run_here(fp32, tmp_path):
    target, segment, convert_dir = fp32
    assert "no CUDA GPU" in target.can_execute()
    built = target.build(segment, convert_dir, tmp_path, compile_cfg())
    with pytest.raises(TargetUnavailable, match="no CUDA GPU") as err:
        target.load_engine(built, tmp_path, {})
    assert "\n" not in err.value.one_line()


# --- the whole pipeline with target=tensorrt ------------------------------------------------

@pytest.fixture(scope="module")
def trt_job(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("trt-job"), "target=tensorrt")


@no_gpu
def test_pipeline_builds_engines_and_says_why_not_validated(trt_job):
    job = trt_job
    assert job.result.status == "FINISHED"
    report = job.json("validate/report.json")
    assert report["validated"] is False and "no CUDA GPU" in report["reason"]
    assert report["accuracy"] is None and report["latency"] is None
    assert report["precision_achieved"] == "fp32" and report["passed"]
    assert "accuracy and latency not measured" in job.log
    engines = job.json("build/engines.json")
    assert engines["target"] == "tensorrt" and engines["segments"]
    for seg in engines["segments"]:
        assert (job.run_dir / "build" / seg["engine"]).stat().st_size > 0
        network = json.loads((job.run_dir / "build" / seg["network"]).read_text())
        assert network["layers"] and network["strongly_typed"]
    converted = job.json("convert/segments.json")["segments"]
    assert all(s["parser_support"]["supported"] for s in converted)


@no_gpu
def test_mlflow_run_carries_engines_and_not_validated(trt_job):
    client = mlflow_client(trt_job.outputs)
    (run,) = mlflow_runs(client)
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["validated"] == "false" and tags["precision.achieved"] == "fp32"
    assert metrics["num_engines"] == len(trt_job.json("build/engines.json")["segments"])
    assert metrics["engine_bytes"] > 0 and metrics["build_seconds"] > 0
    logged = artifact_paths(client, run.info.run_id, "build")
    assert {"build/accel_0.plan", "build/accel_0.network.json", "build/engines.json"} <= logged


def test_asking_fp16_and_getting_fp32_fails(trt_job):
    """Real fp32 engines checked against an fp16 request: the message says what was built."""
    engines = trt_job.json("build/engines.json")
    achieved, failures = achieved_precision(engines, "fp16")
    assert achieved == "fp32"
    assert failures == [failures[0]] and "asked for fp16 but the engines compute in fp32" in failures[0]
    assert achieved_precision(engines, "fp32") == ("fp32", [])
    assert achieved_precision({"segments": [{"name": "accel_0"}]}, "fp16") == (None, [])


@no_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resnet18_engines(tmp_path, precision):
    job = run_job(tmp_path, *RESNET18, "target=tensorrt", f"compile.precision={precision}")
    assert job.result.status == "FINISHED"
    assert job.result.tags["precision.achieved"] == precision
    (seg,) = job.json("build/engines.json")["segments"]
    assert (job.run_dir / "build" / seg["engine"]).stat().st_size > 5_000_000
    network = json.loads((job.run_dir / "build" / seg["network"]).read_text())
    dtype = {"fp32": "float32", "fp16": "float16"}[precision]
    convs = [layer for layer in network["layers"] if layer["type"] == "LayerType.CONVOLUTION"]
    assert len(convs) == 20 and all(c["precision"] == dtype for c in convs)
    assert job.json("partition/report.json")["totals"]["accelerated_op_fraction"] == 1.0
