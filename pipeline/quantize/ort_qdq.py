"""ONNX Runtime's static QDQ (or dynamic) quantization of one segment, and what of it runs in int8.

The field's own recipe, step for step: `quant_pre_process` (symbolic shape inference and
ONNX optimisation, which quantization needs to see fused Conv+BN and known shapes), then
`quantize_static` in QDQ format with per-channel int8 weights and uint8 activations
(what ORT's x86 kernels run fastest with AVX512-VNNI), calibrated with the segment's
real inputs. The QDQ model is portable (TensorRT builds it too); the engine is what ORT
makes of it (QLinearConv & co.), so "is it int8?" is answered on the engine itself.
quantize.mode=dynamic takes `quantize_dynamic` instead: int8 weights, activations quantized
per batch at run time (ORT's advice for transformers: on BERT-base here it was both more
accurate and faster than static QDQ, BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

from pipeline.errors import CompileError, first_line

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Ops that do the multiply-accumulates, in float graphs and after ORT's fusions.
FLOAT_COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"}
# The int8 compute ops of dynamically quantized graphs (quantize_dynamic), before ORT's fusions.
INTEGER_COMPUTE = {"MatMulInteger", "ConvInteger"}
INT8_COMPUTE = {*INTEGER_COMPUTE, "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QLinearConvTranspose", "NhwcQLinearConv", "QAttention",
                "DynamicQuantizeLSTM"}


class Reader:
    """ORT's CalibrationDataReader protocol over captured segment inputs."""

    def __init__(self, names: list[str], inputs: list[tuple]):
        self.names, self.inputs, self.position = names, inputs, 0

    def get_next(self) -> dict[str, Any] | None:
        if self.position >= len(self.inputs):
            return None
        self.position += 1
        return dict(zip(self.names, self.inputs[self.position - 1], strict=False))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def rewind(self) -> None:
        self.position = 0

    def set_range(self, start_index: int, end_index: int) -> None:  # used by ORT's batched calibration
        self.position = start_index


def input_names(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


@contextlib.contextmanager
def scratch_cwd(folder):
    """ORT's pre-processing writes its temporary models (sym_shape_infer_temp.onnx, <uuid>.data) into
    the current folder: run it in the job's scratch folder so they never land in the user's one.
    The stage worker runs one stage at a time, so changing its folder touches nothing else."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def preprocess(source: Path, request, name: str) -> Path:
    """quant_pre_process once per segment and job (the rounds reuse it).

    ORT's symbolic shape inference gives up on some dynamic graphs (BERT with dynamic batch
    and sequence); ORT's advice is then to skip it and keep ONNX's own shape inference.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, source = Path(request.workdir).resolve() / f"{name}.pre.onnx", Path(source).resolve()
    if pre.is_file():
        return pre
    try:
        with scratch_cwd(request.workdir):
            quant_pre_process(str(source), str(pre), skip_symbolic_shape=False)
    except Exception:  # "Incomplete symbolic shape inference", and the like
        try:
            with scratch_cwd(request.workdir):
                quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        except Exception as err:
            raise CompileError(f"onnxruntime could not prepare segment {name} for quantization: "
                               f"{first_line(err)}",
                               "keep the failing ops in PyTorch with compile.torch_executed_ops, "
                               "or use compile.precision=fp32.") from err
    return pre


def float_model(source: Path, request, name: str) -> Path:
    """The fp32 model the quantizer reads: pre-processed, and smoothed where the request asks."""
    pre = preprocess(source, request, name)
    if request.smooth_alpha is None:
        return pre
    from pipeline.quantize.smooth import smoothed

    alpha = float(request.smooth_alpha)
    return smoothed(pre, request.inputs, alpha, Path(request.workdir).resolve() / f"{name}.smooth{alpha:g}.onnx")


def quantize(source: Path, out: Path, name: str, request, tensorrt: bool = False, fp8: bool = False) -> Path:
    """The segment's QDQ int8 model (out/<name>.qdq.onnx), nodes in request.exclude left in fp32.

    tensorrt=True writes what TensorRT's explicit quantization accepts: signed int8
    activations with symmetric scales (zero points of 0) and float biases. fp8=True writes
    FLOAT8E4M3FN weights and activations (opset >= 19; torch.onnx exports 20), which ORT
    calibrates only by each tensor's distribution (CalibrationMethod.Distribution), whatever
    request.method says.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre = float_model(source, request, name)
    qdq = out / f"{name}.qdq.onnx"
    if request.mode == "dynamic":
        return dynamic(pre, qdq, name, request)
    options = {"CalibMovingAverage": False}
    if tensorrt:
        options.update(ActivationSymmetric=True, WeightSymmetric=True, QuantizeBias=False)
    if fp8:
        calibration = {"calibration_data_reader": Reader(input_names(pre), request.inputs)}
    elif cached_ranges_supported():
        calibration = {"calibration_data_reader": None,
                       "calibration_cache_path": str(ranges(pre, request, name, tensorrt))}
    else:  # older ORT: its own calibrator each round (its entropy then equals minmax)
        calibration = {"calibration_data_reader": Reader(input_names(pre), request.inputs)}
    try:
        quantize_static(
            str(pre), str(qdq), **calibration, quant_format=QuantFormat.QDQ,
            per_channel=request.per_channel, weight_type=QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8,
            activation_type=(QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8 if tensorrt else QuantType.QUInt8),
            calibrate_method=getattr(CalibrationMethod, "Distribution" if fp8 else METHODS[request.method]),
            nodes_to_exclude=list(request.exclude), op_types_to_quantize=list(request.op_types) or None,
            extra_options=options,
        )
    except Exception as err:  # ORT's quantizer raises many types; the first line is the message
        raise CompileError(f"onnxruntime could not quantize segment {name}: {first_line(err)}",
                           "keep the failing layer in fp32 with quantize.exclude, or use compile.precision=fp32.") from err
    if request.exclude:
        float_inputs(qdq, set(request.exclude), pre)
    return qdq


def dynamic(pre: Path, qdq: Path, name: str, request) -> Path:
    """ORT's quantize_dynamic: int8 weights, activations quantized per batch at run time
    (DynamicQuantizeLinear before MatMulInteger/ConvInteger), so no calibrated ranges to get wrong."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(pre), str(qdq), weight_type=QuantType.QInt8, per_channel=request.per_channel,
                         nodes_to_exclude=list(request.exclude), op_types_to_quantize=list(request.op_types) or None)
    except Exception as err:  # ORT's quantizer raises many types; the first line is the message
        raise CompileError(f"onnxruntime could not quantize segment {name} dynamically: {first_line(err)}",
                           "keep the failing layer in fp32 with quantize.exclude, or use quantize.mode=static.") from err
    return qdq


def cached_ranges_supported() -> bool:
    """quantize_static takes precomputed ranges (calibration_cache_path) in recent ORT (1.32 here)."""
    import inspect

    from onnxruntime.quantization import calibrate, quantize_static

    return (hasattr(calibrate, "save_tensors_data")
            and "calibration_cache_path" in inspect.signature(quantize_static).parameters)


def ranges(pre: Path, request, name: str, symmetric: bool) -> Path:
    """Activation ranges from ORT's calibrator, once per segment and job (the rounds reuse them).

    Run here rather than inside quantize_static, which builds the entropy calibrator with 128
    histogram bins for 128 quantized bins: the KL search then has one candidate, the full
    range, and "entropy" equals minmax. TensorRT's recipe (2048 bins, 128 quantized) is used.
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    path = Path(request.workdir) / f"{Path(pre).stem}.{request.method}.{'sym' if symmetric else 'asym'}.ranges.json"
    if path.is_file():
        return path
    options = {"symmetric": symmetric, "moving_average": False, "num_bins": 2048, "num_quantized_bins": 128,
               "percentile": 99.999}
    calibrator = create_calibrator(pre, list(request.op_types) or None,
                                   augmented_model_path=str(Path(request.workdir) / f"{name}.augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, METHODS[request.method]),
                                   extra_options=options)
    calibrator.collect_data(Reader(input_names(pre), request.inputs))
    save_tensors_data(calibrator.compute_data(), path)
    return path


def float_inputs(qdq: Path, excluded: set[str], pre: Path) -> None:
    """Excluded layers read the fp32 tensors, not their quantized copies.

    quantize_static leaves an excluded node's weights alone but, when a tensor it reads is
    quantized for another consumer, the excluded node reads the dequantized copy too (and so
    still suffers the quantization it was excluded from). Each such input is pointed back at
    the tensor the QuantizeLinear read. With uint8 activations ORT also drops a Relu (or
    Clip) whose output it quantizes, letting the QuantizeLinear's clamp at zero stand in for
    it: the tensor it read is then the raw output of the layer before, and the activation
    is put back (from the fp32 pre-processed model) for the fp32 reader.
    """
    import onnx

    model = onnx.load(str(qdq))
    original = {out: node for node in onnx.load(str(pre), load_external_data=False).graph.node
                for out in node.output}
    producers = {out: node for node in model.graph.node for out in node.output}
    changed = False
    for node in list(model.graph.node):
        if node.name not in excluded:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source, changed = q.input[0], True
            was = original.get(source)
            if was is not None and was.op_type in FOLDED_ACTIVATIONS and producers[source].op_type != was.op_type:
                source = _restore_activation(model, was, source, before=node)
            node.input[i] = source
    if changed:
        _drop_dead_qdq(model.graph)
        onnx.save(model, str(qdq))


# Activations ORT's QDQ quantizer removes when a uint8 QuantizeLinear clamps their output anyway.
FOLDED_ACTIVATIONS = ("Relu", "Clip")


def _restore_activation(model, was, source: str, before) -> str:
    """A copy of the dropped activation `was` reading `source`, placed before `before`; its output's name."""
    import onnx

    out = f"{source}_fp32"
    if any(out in n.output for n in model.graph.node):
        return out
    act = onnx.helper.make_node(was.op_type, [source, *was.input[1:]], [out], name=f"{was.name}_fp32")
    act.attribute.extend(was.attribute)
    nodes = model.graph.node
    nodes.insert(list(nodes).index(before), act)
    return out


def _drop_dead_qdq(graph) -> None:
    """Q/DQ pairs nobody reads any more (ORT would drop them, and with them the int8 fusion)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in used for out in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def int8_fractions(qdq_path: Path, example: tuple | None = None, requantized: bool = True) -> dict[str, Any]:
    """Of the compute ops (Conv, MatMul, Gemm) of the QDQ model: how many, and how many MACs, are int8.

    A compute op is int8 when its inputs come through DequantizeLinear and, for ORT
    (`requantized`), its output goes into a QuantizeLinear (the pattern ORT fuses into QLinear
    kernels). TensorRT runs a layer in int8 from its quantized inputs alone and keeps the output
    in the precision its readers ask for (modelopt's graphs have no output Q). MACs come from the
    shapes ONNX infers. With dynamic inputs those are symbolic, and a symbolic size would
    count as 1 (attention's MatMuls, sized by the sequence, all but vanish): `example`, one
    calibration batch in input order, pins the graph inputs to real sizes first.
    """
    import onnx

    model = onnx.load(str(qdq_path))
    if example:
        _pin_inputs(model.graph, example)
    model = onnx.shape_inference.infer_shapes(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    ops = macs = int8_ops = int8_macs = 0
    int8_layers, float_layers = [], []
    for node in model.graph.node:
        if node.op_type not in FLOAT_COMPUTE and node.op_type not in INTEGER_COMPUTE:
            continue
        count = _macs(node, shapes, producers)
        # Dynamic quantization's MatMulInteger/ConvInteger take int8 operands directly.
        quantized = node.op_type in INTEGER_COMPUTE or (
            all(i in producers and producers[i].op_type == "DequantizeLinear" for i in node.input[:2])
            and (not requantized or _requantized(node.output[0], consumers)))
        ops, macs = ops + 1, macs + count
        if quantized:
            int8_ops, int8_macs = int8_ops + 1, int8_macs + count
        (int8_layers if quantized else float_layers).append(node.name)
    return {"compute_ops": ops, "int8_ops": int8_ops, "int8_op_fraction": int8_ops / ops if ops else 0.0,
            "int8_mac_fraction": int8_macs / macs if macs else 0.0, "macs": macs, "int8_macs": int8_macs,
            "fp32_layers": float_layers,
            "int8_layers": len(int8_layers)}


def _pin_inputs(graph, example: tuple) -> None:
    """Graph inputs (not initializers) get the sizes of `example`'s arrays, in order."""
    weights = {i.name for i in graph.initializer}
    for value, array in zip([v for v in graph.input if v.name not in weights], example, strict=False):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == len(getattr(array, "shape", ())):
            for dim, size in zip(dims, array.shape, strict=True):
                dim.dim_value = int(size)


def _requantized(name: str, consumers: dict[str, list]) -> bool:
    """The layer's output (through a Relu/Clip ORT fuses) goes into a QuantizeLinear: ORT runs it as QLinear*."""
    after = consumers.get(name, [])
    if any(n.op_type == "QuantizeLinear" for n in after):
        return True
    return len(after) == 1 and after[0].op_type in ("Relu", "Clip") and _requantized(after[0].output[0], consumers)


def _macs(node, shapes: dict[str, list[int]], producers) -> int:
    """Multiply-accumulates of one Conv/MatMul/Gemm from its output and weight shapes."""
    def shape(name: str) -> list[int]:
        while name not in shapes and name in producers and producers[name].op_type == "DequantizeLinear":
            name = producers[name].input[0]
        return shapes.get(name, [])

    out, weight = shape(node.output[0]), shape(node.input[1])
    if not out or not weight:
        return 1
    if node.op_type in ("Conv", "FusedConv", "ConvTranspose", "ConvInteger"):
        return math.prod(out) * math.prod(weight[1:])
    data = shape(node.input[0])
    trans_a = any(a.name == "transA" and a.i for a in node.attribute)
    k = (data[0] if trans_a else data[-1]) if data else weight[0]
    return math.prod(out) * k


def engine_ops(engine: Path) -> dict[str, int]:
    """Compute ops of the engine ORT saved, by kind: int8 kernels and float ones."""
    import onnx

    model = onnx.load(str(engine), load_external_data=False)
    kinds = [n.op_type for n in model.graph.node]
    return {"int8_kernels": sum(k in INT8_COMPUTE for k in kinds),
            "float_kernels": sum(k in FLOAT_COMPUTE for k in kinds)}


def inspect(qdq: Path, engine: Path, example: tuple | None = None) -> dict[str, Any]:
    """engines.json facts: the int8 fractions of the QDQ model and the kernels of the engine.

    `precision` lists the dtypes the engine computes in (int8 only where ORT really chose
    int8 kernels), which validate's precision check reads.
    """
    fractions, kernels = int8_fractions(qdq, example), engine_ops(engine)
    precision = (["int8"] if kernels["int8_kernels"] else []) + (["float32"] if kernels["float_kernels"] else [])
    return {"qdq_model": qdq.name, "precision": precision, "int8": {**fractions, **kernels}}
