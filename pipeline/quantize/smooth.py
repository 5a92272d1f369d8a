"""SmoothQuant (Xiao et al., 2023) as an ONNX graph transform: activation outliers moved into the weights.

Trained transformers have a few activation channels far larger than the rest; one int8 scale
for the whole tensor then rounds the ordinary channels to a handful of levels, and keeping
layers in fp32 one by one buys little (all-MiniLM-L6-v2: cosine 0.9917 with nothing kept,
0.9930 with six more layers kept). SmoothQuant divides each input channel j of a matrix
product by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) and multiplies row j of the weight by
it: the product is unchanged in fp32, the activation is flatter and the weight, quantized
per output channel, absorbs the range. ONNX Runtime offers it only through Intel Neural
Compressor (not installed here), so this is the transform itself: a Mul by 1/s before the
layers that read the activation (one per activation, shared by Q, K and V), ranges from the
segment's calibration inputs.

Only activations that no LayerNormalization produced are smoothed: on all-MiniLM-L6-v2 with
ORT's dynamic int8, smoothing the attention-output and FFN-output projections' inputs raised
the mean per-sample cosine from 0.9917 to 0.9958, while smoothing the LayerNorm outputs too
lowered it to 0.9945 (LayerNorm outputs alone: 0.9905; BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

# Bounds of the per-channel factors: a dead channel (max 0) must not blow its weight row up.
FACTOR_RANGE = (1e-2, 1e2)


def smoothed(pre: Path, inputs: list[tuple], alpha: float, out: Path) -> Path:
    """`pre` with its matrix products' activations smoothed (out, written once per segment and job)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if out.is_file():
        return out
    model = onnx.load(str(pre))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    readers = _readers(graph, weights)
    peaks = _peaks(pre, list(readers), inputs, out.with_suffix(".ranges.onnx"))
    for activation, nodes in readers.items():
        rows = [np.abs(numpy_helper.to_array(weights[n.input[1]])).max(axis=1) for n in nodes]
        factors = np.clip(np.maximum(peaks[activation], 1e-5) ** alpha
                          / np.maximum(np.max(rows, axis=0), 1e-5) ** (1 - alpha), *FACTOR_RANGE).astype(np.float32)
        for node in nodes:  # a weight read by two layers would be scaled twice: each gets its own copy
            w = numpy_helper.to_array(weights[node.input[1]]) * factors[:, None]
            node.input[1] = f"{node.input[1]}_smoothed_{node.name}"
            graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), node.input[1]))
        inverse, smooth_out = f"{activation}_smooth_inverse", f"{activation}_smoothed"
        graph.initializer.append(numpy_helper.from_array((1.0 / factors).astype(np.float32), inverse))
        position = min(list(graph.node).index(n) for n in nodes)
        graph.node.insert(position, helper.make_node("Mul", [activation, inverse], [smooth_out],
                                                     name=f"{activation}_smooth"))
        for node in nodes:
            node.input[0] = smooth_out
    _drop_unused(graph)
    onnx.save(model, str(out))
    return out


def _readers(graph, weights: dict) -> dict[str, list]:
    """{activation: the MatMul/Gemm nodes reading it against a 2-D weight}, LayerNorm outputs left out."""
    producers = {o: n for n in graph.node for o in n.output}
    found: dict[str, list] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        if any(a.name in ("transA", "transB") and a.i for a in node.attribute) or len(weights[node.input[1]].dims) != 2:
            continue
        source = node.input[0]
        if source in weights or (source in producers and producers[source].op_type == "LayerNormalization"):
            continue
        found.setdefault(source, []).append(node)
    return found


def _peaks(pre: Path, names: list[str], inputs: list[tuple], augmented: Path) -> dict:
    """Per-channel max |x| (last axis) of each named tensor over the calibration inputs, in fp32."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(pre))
    weights = {i.name for i in model.graph.initializer}
    feeds = [i.name for i in model.graph.input if i.name not in weights]
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in present)
    onnx.save(model, str(augmented))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as named
        session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
        peaks: dict = {}
        for batch in inputs:
            for name, value in zip(names, session.run(names, dict(zip(feeds, batch, strict=False))), strict=True):
                peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                peaks[name] = np.maximum(peaks.get(name, peak), peak)
        return peaks
    finally:
        augmented.unlink(missing_ok=True)


def _drop_unused(graph) -> None:
    """Original weights that only smoothed layers read."""
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
