"""A QDQ graph for TensorRT: strongly typed networks take int8 from Q/DQ nodes (explicit quantization).

TensorRT 10+/11 and TensorRT-RTX dropped implicit INT8 calibration: the precision comes
from the graph. NVIDIA Model Optimizer (`modelopt.onnx.quantization.quantize`, the route
Torch-TensorRT documents for INT8 PTQ) writes such a graph and is used when it imports:
the `[quant]` extra installs the base package and its `[onnx]` extra's packages by hand
(that extra pins onnx ~=1.21 and onnxruntime-gpu ~=1.24, which clash with this project's),
and modelopt calibrates on ORT's CPU provider. Where it is missing the graph comes from
ONNX Runtime's quantize_static in the form TensorRT accepts (signed int8 activations and
weights, symmetric scales, zero points of 0, float biases). compile.precision=fp8 takes the
same two routes with FLOAT8E4M3FN Q/DQ (modelopt's quantize_mode="fp8"; ORT's
QFLOAT8E4M3FN, calibrated by each tensor's distribution, the only method ORT has for float8).
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path
from typing import Any

from pipeline.errors import CompileError, first_line

MODELOPT_METHODS = {"minmax": "max", "entropy": "entropy"}
# target.quantizer: auto takes modelopt where it imports.
TOOLS = ("auto", "modelopt", "onnxruntime")


@functools.cache
def modelopt_available() -> bool:
    """modelopt's ONNX quantizer imports: the base package alone installs it without its [onnx] deps."""
    try:
        importlib.import_module("modelopt.onnx.quantization")
    except ImportError:
        return False
    return True


def serves(method: str, per_channel: bool) -> bool:
    """modelopt's ONNX PTQ calibrates with max or entropy and quantizes weights per channel: auto
    takes ORT's route for the rest (percentile, per-tensor weights)."""
    return method in MODELOPT_METHODS and per_channel


def refusal(config: dict[str, Any]) -> tuple[str, str] | None:
    """target.quantizer=modelopt with what modelopt cannot do (or without modelopt): refused before any stage."""

    if config["target"].get("quantizer") != "modelopt":
        return None
    if not modelopt_available():
        return ("target.quantizer=modelopt but modelopt.onnx.quantization does not import here",
                "pip install -e '.[quant]', or set target.quantizer=auto")
    cal = config["calibration"]
    if not serves(cal["method"], bool(cal["per_channel"])):
        return (f"modelopt calibrates with minmax or entropy and per-channel weights, not calibration.method="
                f"{cal['method']} with per_channel={cal['per_channel']}",
                "set target.quantizer=onnxruntime (or auto), or calibration.method=minmax calibration.per_channel=true")
    return None


def quantize(segment: dict[str, Any], convert_dir: Path, out: Path, precision: str = "int8",
             tool: str | None = "auto") -> tuple[Path, str]:
    """(the segment's QDQ model in `out`, the tool that made it); precision int8 or fp8 (FP8 E4M3 Q/DQ)."""
    from pipeline.quantize import ort_qdq

    request, name = segment["quantize"], segment["name"]
    source = convert_dir / segment["onnx"]
    if tool == "modelopt" or (tool in ("auto", None) and serves(request.method, request.per_channel)
                              and modelopt_available()):
        return with_modelopt(source, out, name, request, precision), "modelopt"
    qdq = ort_qdq.quantize(source, out, name, request, tensorrt=True, fp8=precision == "fp8")
    return qdq, "onnxruntime.quantization" + (" (float8e4m3fn, distribution calibration)" if precision == "fp8" else "")


def with_modelopt(source: Path, out: Path, name: str, request, precision: str = "int8") -> Path:
    """modelopt's int8 (or fp8) PTQ: max (minmax) or entropy calibration on the segment's inputs, fp32 elsewhere."""
    import numpy as np
    from modelopt.onnx.quantization import quantize as modelopt_quantize

    from pipeline.quantize.ort_qdq import input_names

    if request.method not in MODELOPT_METHODS:
        raise CompileError(f"modelopt has no {request.method} calibration for {precision} (it has minmax and entropy).",
                           "set calibration.method=minmax or entropy for target=tensorrt.")
    names = input_names(source)
    data = {n: np.concatenate([batch[i] for batch in request.inputs]) for i, n in enumerate(names)}
    qdq = out / f"{name}.qdq.onnx"
    try:
        modelopt_quantize(onnx_path=str(source), quantize_mode=precision, calibration_data=data,
                          calibration_method=MODELOPT_METHODS[request.method], calibration_eps=["cpu"],
                          nodes_to_exclude=[f"^{re.escape(n)}$" for n in request.exclude] or None,
                          op_types_to_quantize=list(request.op_types) or None,
                          high_precision_dtype="fp32", output_path=str(qdq), log_level="WARNING")
    except Exception as err:  # modelopt raises many types; the first line is the message
        raise CompileError(f"modelopt could not quantize segment {name}: {first_line(err)}",
                           "keep the failing layer in fp32 with quantize.exclude, or use compile.precision=fp32.") from err
    return qdq
