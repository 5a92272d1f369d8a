"""compile.truncate_long_and_double as in Torch-TensorRT: float64 segments become float32 engines."""

from __future__ import annotations

import onnx
import pytest
from testkit import run_job

DOUBLE = ("model._target_=testkit.double_net", "input.tensors.0.shape=[2,8]", "compile.min_block_size=1")


def onnx_dtypes(job) -> set[int]:
    (segment,) = job.json("convert/segments.json")["segments"]
    model = onnx.load(str(job.run_dir / "convert" / segment["onnx"]), load_external_data=False)
    types = {init.data_type for init in model.graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    types |= {a.i for node in model.graph.node for a in node.attribute if node.op_type == "Cast" and a.name == "to"}
    return types


@pytest.mark.parametrize("truncate", [False, True])
def test_onnx_segments_lose_float64_only_when_asked(tmp_path, truncate):
    job = run_job(tmp_path, *DOUBLE, "target=onnxruntime", f"compile.truncate_long_and_double={truncate}")
    assert job.result.status == "FINISHED"
    assert (onnx.TensorProto.DOUBLE in onnx_dtypes(job)) is not truncate
    (segment,) = job.json("build/engines.json")["segments"]
    assert segment["truncated_double"] is truncate
    assert job.json("validate/report.json")["accuracy"]["rel_l2_err"] < 1e-5


def test_tensorrt_builds_float64_segments_as_float32(tmp_path):
    """TensorRT computes in no float64: with truncation the ONNX it parses has none either."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    job = run_job(tmp_path, *DOUBLE, "target=tensorrt", "compile.truncate_long_and_double=true")
    assert job.result.status == "FINISHED" and job.result.tags["precision.achieved"] == "fp32"
    assert onnx.TensorProto.DOUBLE not in onnx_dtypes(job)
    (segment,) = job.json("build/engines.json")["segments"]
    assert segment["truncated_double"] and (job.run_dir / "build" / segment["engine"]).stat().st_size > 0
