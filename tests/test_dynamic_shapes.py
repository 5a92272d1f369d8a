"""Dynamic shapes end to end: input specs, checked corners, dynamic ONNX and TensorRT profiles."""

from __future__ import annotations

import json

import onnx
import pytest
from testkit import run_job

from pipeline.errors import ConfigError

# tiny_cnn on small images with batch 1..6 (opt 3): seconds per job.
DYN_CNN = ("input=image_dynamic_batch", "input.tensors.0.shape=[batch,3,32,32]",
           "input.dims.batch.opt=3", "input.dims.batch.max=6")


@pytest.fixture(scope="module")
def cnn_job(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("dyn-cnn"), *DYN_CNN, "target=onnxruntime",
                   "validate.latency_at_corners=true")


def test_accuracy_is_checked_at_every_corner_and_between(cnn_job):
    assert cnn_job.result.status == "FINISHED"
    report = cnn_job.json("validate/report.json")
    checked = {s["name"]: s["dims"] for s in report["shapes"]}
    assert checked["min"] == {"batch": 1} and checked["opt"] == {"batch": 3} and checked["max"] == {"batch": 6}
    randoms = [d["batch"] for n, d in checked.items() if n.startswith("random")]
    assert len(randoms) == 2 and all(1 <= b <= 6 for b in randoms)
    assert all(s["passed"] and s["accuracy"]["rel_l2_err"] < 1e-4 for s in report["shapes"])
    metrics = cnn_job.result.metrics
    for name in ("min", "opt", "max", "random0"):
        assert f"rel_l2_err.{name}" in metrics and f"cosine_similarity.{name}" in metrics
    assert set(report["latency"]["at"]) == {"min", "opt", "max"}
    assert "latency_p50_ms.min" in metrics and "latency_p50_ms.max" in metrics
    assert report["latency"]["dims"] == {"batch": 3}


def test_one_onnx_file_serves_every_batch(cnn_job):
    (segment,) = cnn_job.json("convert/segments.json")["segments"]
    assert segment["profiles"] == [{"min": [[1, 3, 32, 32]], "opt": [[3, 3, 32, 32]], "max": [[6, 3, 32, 32]]}]
    model = onnx.load(str(cnn_job.run_dir / "convert" / segment["onnx"]), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    exported = cnn_job.json("export/model.json")
    assert exported["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert exported["dims"] == {"batch": {"min": 1, "opt": 3, "max": 6}}


def test_tensorrt_rtx_builds_one_profile_per_spec(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
    job = run_job(tmp_path, *DYN_CNN, "target=tensorrt",
                  "+input.extra_profiles=[{batch:{min:8,opt:12,max:16}}]")
    assert job.result.status == "FINISHED"
    (segment,) = job.json("build/engines.json")["segments"]
    assert segment["num_profiles"] == 2
    assert [p["max"][0][0] for p in segment["profiles"]] == [6, 16]
    network = json.loads((job.run_dir / "build" / segment["network"]).read_text())
    assert network["inputs"][0]["shape"][0] == -1  # the batch stays dynamic in the engine
    assert (job.run_dir / "build" / segment["engine"]).stat().st_size > 0


BAD_SPECS = {
    "min_above_opt": (("input.dims.batch.min=4",), "min > opt"),
    "opt_above_max": (("input.dims.batch.opt=9",), "opt > max"),
    "unknown_dim": (("input.tensors.0.shape=[batches,3,32,32]",), "names dimension 'batches'"),
    "unused_dim": (("input.tensors.0.shape=[2,3,32,32]",), "input.dims.batch is not used"),
    "not_a_dim": (("~input.dims.batch.max",), "is not a dynamic dimension"),
    "model_rejects": (("input.tensors.0.shape=[batch,5,32,32]",), "does not fit model tiny_cnn"),
    "specialised": (("model._target_=testkit.batch_branch_net", "input.tensors.0.shape=[batch,8]"),
                    "does not keep input dimension(s) batch dynamic (torch "),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_invalid_specs_fail_in_one_line_before_building(tmp_path, case):
    extra, message = BAD_SPECS[case]
    job = None
    with pytest.raises(ConfigError) as err:
        job = run_job(tmp_path, *DYN_CNN, "target=onnxruntime", *extra)
    assert job is None
    line = err.value.one_line()
    assert message in line and "\n" not in line
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "FAILED"
    assert [s["name"] for s in run["stages"]] == []  # nothing was built or published


# --- transformers and data-dependent fallback --------------------------------------------

# bert_tiny over batch 1..3 and sequence 8..24: the whole encoder, seconds per corner.
TEXT = ("model=bert_tiny", "input=text_dynamic", "input.dims.batch.opt=2", "input.dims.batch.max=3",
        "input.dims.seq.opt=16", "input.dims.seq.max=24", "target=onnxruntime")


@pytest.fixture(scope="module")
def bert_job(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    return run_job(tmp_path_factory.mktemp("bert"), *TEXT)


def test_bert_tiny_keyword_integer_inputs_at_every_corner(bert_job):
    assert bert_job.result.status == "FINISHED"
    exported = bert_job.json("export/model.json")
    assert [(i["name"], i["shape"], i["dtype"], i["keyword"]) for i in exported["inputs"]] == [
        ("input_ids", ["batch", "seq"], "int64", True), ("attention_mask", ["batch", "seq"], "int64", True)]
    partition = bert_job.json("partition/report.json")["totals"]
    assert partition["accelerated_segments"] == 1 and partition["torch_ops"] == 0
    report = bert_job.json("validate/report.json")
    checked = {s["name"]: s for s in report["shapes"]}
    assert checked["min"]["dims"] == {"batch": 1, "seq": 8} and checked["max"]["dims"] == {"batch": 3, "seq": 24}
    assert all(s["passed"] and s["accuracy"]["max_abs_err"] < 1e-3 for s in report["shapes"])
    (segment,) = bert_job.json("convert/segments.json")["segments"]
    model = onnx.load(str(bert_job.run_dir / "convert" / segment["onnx"]), load_external_data=False)
    for value in model.graph.input:
        assert all(d.dim_param for d in value.type.tensor_type.shape.dim)  # batch and sequence stay dynamic


def test_a_loaded_dynamic_program_refuses_sizes_outside_its_ranges_in_one_sentence(bert_job, cnn_job):
    import torch

    import pipeline
    from pipeline.input_guard import InputShapeError

    module = pipeline.load(bert_job.run_dir)
    ids = torch.ones(2, 4, dtype=torch.int64)  # seq 4 < its min 8
    with pytest.raises(InputShapeError) as short:
        module(input_ids=ids, attention_mask=ids)
    assert str(short.value) == ("input input_ids of shape (2, 4) has seq=4 on axis 1, the engine takes seq in "
                                "8..24: this engine takes input_ids (batch in 1..3, seq in 8..24), "
                                "attention_mask (batch in 1..3, seq in 8..24).")
    with pytest.raises(InputShapeError, match="attention_mask of shape \\(2, 9\\) has seq=9 on axis 1, "
                                              "another input has seq=8"):
        module(input_ids=torch.ones(2, 8, dtype=torch.int64), attention_mask=torch.ones(2, 9, dtype=torch.int64))
    within = module(input_ids=torch.ones(3, 24, dtype=torch.int64), attention_mask=torch.ones(3, 24, dtype=torch.int64))
    assert within is not None
    cnn = pipeline.load(cnn_job.run_dir)
    with pytest.raises(InputShapeError, match=r"x of shape \(7, 3, 32, 32\) has batch=7 on axis 0, the engine "
                                              r"takes batch in 1..6"):
        cnn(torch.randn(7, 3, 32, 32))
    with pytest.raises(InputShapeError, match=r"has 3 dimensions, the engine takes 4"):
        cnn(torch.randn(3, 32, 32))


def test_data_dependent_op_falls_back_between_accelerated_blocks(tmp_path):
    job = run_job(tmp_path, "model=data_dependent_net", "compile.min_block_size=1", "target=onnxruntime")
    assert job.result.status == "FINISHED"
    report = job.json("partition/report.json")
    kinds = [s["kind"] for s in report["segments"]]
    assert kinds == ["accelerated", "torch", "accelerated"]
    kept = report["kept_in_torch"]
    assert set(kept) == {"aten.masked_select.default", "aten.median.default"}
    assert all("unsupported by onnxruntime" in reason for v in kept.values() for reason in v["reasons"])
    assert 0 < report["totals"]["accelerated_op_fraction"] < 1
    assert job.result.metrics["num_accelerated_segments"] == 2
    assert job.json("validate/report.json")["passed"]
