"""target=inductor compile.precision=int8: PT2E with torchao's X86InductorQuantizer, built by AOTInductor.

PyTorch's own int8 route on x86 CPUs, step for step as torchao documents it: the segment's
exported program goes through `prepare_pt2e` with `X86InductorQuantizer` (per-channel int8
weights, uint8 activations: what oneDNN's VNNI kernels take), is calibrated with the
segment's real inputs (the same ones ONNX Runtime's route uses), `convert_pt2e` writes the
quantize/dequantize ops, and the program is exported again and compiled into an
AOTInductor package with freezing on: Inductor then folds each dequantize-conv/linear-
quantize pattern into oneDNN int8 kernels (qconv, qlinear) with prepacked weights.

"Is it int8?" is answered on the package itself: the int8 kernels its generated wrapper
calls; the share of compute ops and MACs in int8 comes from the quantized program.
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
import zipfile
from pathlib import Path
from typing import Any

QUANTIZER = "PT2E with torchao's X86InductorQuantizer, built as an AOTInductor package (oneDNN int8 kernels)"
# calibration.method -> torchao's activation observer (HistogramObserver searches the range that
# minimises the quantization error over a histogram: the x86 default, and torch's closest to entropy).
OBSERVERS = {"minmax": "MinMaxObserver", "entropy": "HistogramObserver"}
# aten ops that do the multiply-accumulates (PT2E's graphs keep conv2d and linear undecomposed).
COMPUTE = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "linear", "matmul", "mm", "bmm", "addmm"}
# Calls in AOTInductor's generated wrapper: oneDNN int8 kernels, and float convolutions/GEMMs.
INT8_KERNEL = re.compile(r"aoti_torch_cpu__q(?:conv|linear)\w*\(")
FLOAT_KERNEL = re.compile(r"aoti_torch_cpu_(?!_q)\w*(?:convolution|linear|addmm|_mm|bmm)\w*\(")
INSTALL = "pip install -e '.[quant]' (torchao 0.18 with torch 2.14)"


def refusal(config: dict[str, Any], settings: dict[str, Any]) -> tuple[str, str] | None:
    """(why not, the fix) when this job's settings cannot build int8 with PT2E; None when they can.

    Checked before any stage (pipeline.checks), with the Inductor target's resolved settings
    (`settings`: its device, artifact and freezing as the target made them).
    """
    if importlib.util.find_spec("torchao") is None:
        return "its int8 route needs torchao, which is not installed", INSTALL
    if settings["device"] != "cpu":
        return ("its int8 route (X86InductorQuantizer, oneDNN int8 kernels) runs on the CPU, "
                f"not on target.device={settings['device']}",
                "set target.device=cpu, or use target=onnxruntime (or target=tensorrt) on the GPU")
    if settings.get("freezing") is False:
        return ("its int8 route needs Inductor's freezing (oneDNN's int8 kernels take prepacked weights), and "
                "target.freezing=false turns it off", "remove target.freezing (or set it to true)")
    if settings["artifact"] != "aoti":
        return ("its int8 route builds an AOTInductor package, not target.artifact=compile_cache",
                "set target.artifact=aoti (or auto)")
    cal, quantize = config["calibration"], config["quantize"]
    mode = quantize["mode"]
    if mode != "static":
        return (f"its CPU int8 route (PT2E) calibrates static activation ranges, not quantize.mode={mode} "
                "(torchao's CUDA route's)", "set quantize.mode=static, or target.device=cuda on a GPU")
    if str(cal["method"]) not in OBSERVERS:
        return (f"torchao has no {cal['method']} observer for PT2E calibration",
                f"set calibration.method to one of {', '.join(OBSERVERS)}")
    if not cal["per_channel"]:
        return ("Inductor's int8 kernels take per-channel weights only (per-tensor weights would run in fp32)",
                "leave calibration.per_channel=true")
    if quantize["op_types"]:
        return ("quantize.op_types names ONNX op types, which PT2E does not have",
                "leave quantize.op_types empty with target=inductor (quantize.exclude takes module paths there)")
    return None


def quantization_config(method: str):
    """The x86 default config (per-channel symmetric int8 weights, uint8 activations) with method's observer."""
    import dataclasses

    from torchao.quantization.pt2e import observer
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    base = x86.get_default_x86_inductor_quantization_config()
    act = dataclasses.replace(base.input_activation,
                              observer_or_fake_quant_ctr=getattr(observer, OBSERVERS[method]).with_args(eps=2**-12))
    return dataclasses.replace(base, input_activation=act, output_activation=act)


def quantize(program, example: tuple, request, dynamic_shapes=None):
    """The segment's program quantized by PT2E and calibrated with request.inputs, exported again."""
    import numpy as np
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    quantizer = X86InductorQuantizer().set_global(quantization_config(request.method))
    for path in request.exclude:  # module paths (`layer1.0.conv2`) the accuracy rounds keep in fp32
        quantizer.set_module_name_qconfig(path, None)
    module = program.module()
    mark_module_calls(module.graph)
    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for batch in request.inputs:
            prepared(*(torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
                       for a in batch))
        converted = convert_pt2e(prepared)
        return torch.export.export(converted, example, dynamic_shapes=dynamic_shapes, strict=False)


def mark_module_calls(graph) -> int:
    """Record each call of a leaf module (and each tensor add) as strict export does, for the quantizer.

    X86InductorQuantizer finds its patterns (conv-bn-relu, conv-add-relu, ...) through the
    `source_fn_stack` that strict export writes. Non-strict export (convert's) writes none;
    torch then falls back to `nn_module_stack` and merges every call of a module that runs
    twice (torchvision's BasicBlock.relu) into one partition, which the quantizer refuses:
    "Input partition has more than one output node". Each run of consecutive nodes from one
    module is marked as one call, named after its first node; tensor adds as operator.add.
    Returns how many nodes were marked.
    """
    import operator

    marked, previous, call = 0, None, None
    for node in graph.nodes:
        if node.op != "call_function" or node.meta.get("source_fn_stack"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        fqn, cls = list(stack.values())[-1] if stack else (None, None)
        source = _module_type(cls)
        if source is None and opname(node) in ("add", "add_"):
            source, fqn = operator.add, None
        if source is None:
            previous = None
            continue
        if fqn is None or fqn != previous:
            call = node.name
        previous = fqn
        node.meta["source_fn_stack"] = [(call, source)]
        marked += 1
    return marked


def _module_type(cls):
    """The leaf torch.nn module class nn_module_stack names (a class, or its dotted name once saved)."""
    import importlib

    import torch

    if isinstance(cls, str):
        module_name, _, name = cls.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError):
            return None
    leaf = isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__.startswith("torch.nn.")
    return cls if leaf else None


def build(segment: dict[str, Any], convert_dir: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Quantize one converted segment and compile it into `<name>.pt2`; the engines.json facts."""
    import torch
    import torch._inductor

    from pipeline import programs
    from pipeline.errors import CompileError
    from pipeline.segments import dynamic_dims

    name, request = segment["name"], segment["quantize"]
    if not request.inputs:
        raise CompileError(f"segment {name} received no calibration inputs, so PT2E cannot calibrate it.",
                           "check calibration.num_samples, or use compile.precision=fp32.")
    example = tuple(torch.load(convert_dir / segment["args"], weights_only=True))
    program = programs.load_program(convert_dir / segment["program"])  # never unpickles
    started = time.perf_counter()
    quantized = quantize(program, example, request, dynamic_dims(segment.get("profiles")))
    calibrated = time.perf_counter() - started
    saved = out / f"{name}.int8.program.pt2"
    torch.export.save(quantized, saved)
    engine = out / f"{name}.pt2"
    configs = {"freezing": True, "max_autotune": settings["mode"].startswith("max-autotune")}
    with torch.no_grad():  # Inductor freezes weights (and prepacks them for int8 kernels) for inference only
        torch._inductor.aoti_compile_and_package(quantized, package_path=str(engine), inductor_configs=configs)
    fractions, kernels = int8_fractions(quantized.graph_module), engine_kernels(engine)
    floats = kernels["float_kernels"] or fractions["int8_ops"] < fractions["compute_ops"]
    precision = (["int8"] if kernels["int8_kernels"] else []) + (["float32"] if floats else [])
    return {"engine": engine.name, "bytes": engine.stat().st_size, "quantized_program": saved.name,
            "quantizer": QUANTIZER, "observer": OBSERVERS[request.method], "precision": precision,
            "int8": {**fractions, **kernels}, "quantize_seconds": round(calibrated, 3)}


def engine_kernels(package: Path) -> dict[str, int]:
    """The int8 (oneDNN qconv/qlinear) and float convolution/GEMM calls of the package's generated wrapper."""
    with zipfile.ZipFile(package) as archive:
        code = "\n".join(archive.read(n).decode(errors="replace") for n in archive.namelist()
                         if n.endswith(".wrapper.cpp"))
    return {"int8_kernels": len(INT8_KERNEL.findall(code)), "float_kernels": len(FLOAT_KERNEL.findall(code))}


def opname(node) -> str:
    """The aten/quantized op's name of a call_function node ('' for other nodes)."""
    return getattr(node.target, "_opname", "") if node.op == "call_function" else ""


def _dequantized(node) -> bool:
    return hasattr(node, "op") and opname(node).startswith("dequantize")


def _size(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, RuntimeError):  # an unbacked symbolic size counts as 1
        return 1


def _macs(node) -> int:
    """Multiply-accumulates of one compute op, from its output's and operands' shapes (meta['val'])."""
    def shape(arg) -> list[int]:
        val = arg.meta.get("val") if hasattr(arg, "meta") else None
        return [_size(s) for s in val.shape] if hasattr(val, "shape") else []

    name, args = opname(node), node.args
    out = shape(node)
    operands = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
    data, weight = shape(operands[0]), shape(operands[1])
    if not out or not weight:
        return 1
    if name.startswith("conv"):
        return math.prod(out) * math.prod(weight[1:])
    if name == "linear":
        return math.prod(out) * weight[-1]
    return math.prod(out) * (data[-1] if data else 1)


def int8_fractions(gm, quantized=None) -> dict[str, Any]:
    """Of the compute ops of the quantized program: how many, and how many MACs, read dequantized int8.

    A compute op is int8 when both its data and its weight come through dequantize ops: the
    pattern Inductor replaces by a oneDNN int8 kernel. `quantized(node)` says whether an
    operand is quantized, for graphs with other quantize ops (modelopt's, torch_modelopt).
    """
    quantized = quantized or _dequantized
    ops = macs = int8_ops = int8_macs = 0
    float_layers: list[str] = []
    for node in gm.graph.nodes:
        name = opname(node)
        if name not in COMPUTE:
            continue
        count = _macs(node)
        operands = node.args[1:3] if name == "addmm" else node.args[:2]
        ops, macs = ops + 1, macs + count
        if all(quantized(a) for a in operands):
            int8_ops, int8_macs = int8_ops + 1, int8_macs + count
        else:
            float_layers.append(node.name)
    return {"compute_ops": ops, "int8_ops": int8_ops, "int8_op_fraction": int8_ops / ops if ops else 0.0,
            "int8_mac_fraction": int8_macs / macs if macs else 0.0, "macs": macs, "int8_macs": int8_macs,
            "fp32_layers": float_layers, "int8_layers": int8_ops}
