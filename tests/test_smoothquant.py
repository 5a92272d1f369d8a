"""SmoothQuant as an ONNX transform (pipeline/quantize/smooth.py): the same function in fp32, flatter
activations where int8 reads them, LayerNorm outputs left alone, and better dynamic int8 for it."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def outlier_model(path):
    """x -> LayerNorm -> MatMul(w1) -> Relu -> MatMul(w2), where hidden channel 3 (mm1's output, mm2's
    input) is 60x the others: one int8 scale for mm2's input then flattens every other channel."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 32)).astype(np.float32)
    w1[:, 3] *= 60.0  # hidden channel 3 becomes an outlier
    w2 = rng.normal(size=(32, 8)).astype(np.float32)
    w2[3] /= 60.0  # as in trained transformers: the outlier channel's weights are small
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((np.ones(16, np.float32), "g"), (np.zeros(16, np.float32), "b"), (w1, "w1"), (w2, "w2"))]
    graph = helper.make_graph(nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run(path, batches):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["y"], {"x": b[0]})[0].reshape(-1) for b in batches])


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_smoothing_keeps_fp32_and_helps_dynamic_int8(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.quantize.smooth import smoothed

    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(1, 8, 16)).astype(np.float32),) for _ in range(8)]
    plain = outlier_model(tmp_path / "plain.onnx")
    smooth = smoothed(plain, batches, 0.9, tmp_path / "smooth.onnx")
    model = onnx.load(str(smooth))
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    # One Mul, before mm2: the LayerNorm's output (mm1's input) is not smoothed.
    assert [n.input[0] for n in muls] == ["r"] and next(n for n in model.graph.node if n.name == "mm1").input[0] == "ln"
    reference = run(plain, batches)
    assert np.abs(run(smooth, batches) - reference).max() <= 1e-3 * np.abs(reference).max()
    found = {}
    for name, source in (("plain", plain), ("smooth", smooth)):
        quantize_dynamic(str(source), str(tmp_path / f"{name}.int8.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"])
        found[name] = cosine(run(tmp_path / f"{name}.int8.onnx", batches), reference)
    assert found["smooth"] > found["plain"] and 1 - found["smooth"] < 0.5 * (1 - found["plain"]), found


def test_static_rounds_with_and_without_smoothing_calibrate_their_own_ranges(tmp_path):
    """Round 0 (plain) and round 1 (smoothed) of a static build share a scratch folder: each model gets
    ranges of its own tensors (the smoothed one's Mul output included), not the other's cached ones."""
    from pipeline.quantize import QuantizeRequest, ort_qdq

    rng = np.random.default_rng(2)
    batches = [(rng.normal(size=(1, 8, 16)).astype(np.float32),) for _ in range(8)]
    source = outlier_model(tmp_path / "model.onnx")
    reference = run(source, batches)
    found = {}
    for alpha in (None, 0.9):
        request = QuantizeRequest(inputs=batches, mode="static", smooth_alpha=alpha, op_types=["MatMul"],
                                  workdir=tmp_path)
        out = tmp_path / f"out-{alpha}"
        out.mkdir()
        found[alpha] = cosine(run(ort_qdq.quantize(source, out, "seg", request), batches), reference)
    assert len(list(tmp_path.glob("seg.*.ranges.json"))) == 2
    assert found[0.9] > found[None] > 0.9, found
