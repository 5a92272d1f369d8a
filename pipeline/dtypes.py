"""The one table of dtype names: config names, torch names, precisions and TensorRT's names.

Artifacts (model.json, engines.json, network.json) write dtypes as torch spells them
without the `torch.` prefix ("float16"); configs may also use the precision shorthands
("fp16"). Every translation between those spellings, and TensorRT's `DataType` names,
goes through this module so no two places can disagree.
"""

from __future__ import annotations

# Precision (compile.precision) -> the floating dtype a model is cast to.
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "float8_e4m3fn"}
# Quantized precisions -> the floating dtype the model keeps: it is exported in fp32, and build
# quantizes (the engine's inputs and outputs stay float32). fp8 is calibrated like int8 (FP8 E4M3
# QDQ), never a cast of the whole model.
QUANTIZED_PRECISIONS = {"int8": "float32", "fp8": "float32"}
# Floating dtype -> the precision it computes in (what "precision achieved" reports); int8 tensors
# (QDQ/QLinear engines, TensorRT INT8 layers) report int8.
DTYPE_PRECISIONS = {**{dtype: precision for precision, dtype in PRECISION_DTYPES.items()}, "int8": "int8"}
# Names accepted for input tensors (input.tensors[].dtype): torch names and precision shorthands.
INPUT_DTYPES = {"float32", "float16", "bfloat16", "int64", "int32", "bool"}
FLOAT_INPUT_DTYPES = {"float32", "float16", "bfloat16"}
# Compute dtypes a TensorRT engine may run in (Torch-TensorRT's enabled_precisions before 2.13).
ENGINE_DTYPES = {"float32", "float16", "bfloat16", "float8_e4m3fn", "int8"}
# trt.DataType member names -> torch dtype names.
TENSORRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8",
                   "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8",
                   "FP8": "float8_e4m3fn", "FP4": "float4_e2m1fn_x2", "E8M0": "float8_e8m0fnu", "INT4": "int4"}


def canonical(name: str) -> str | None:
    """A torch dtype name for `name` (a torch name or a precision shorthand), or None."""
    name = str(name).removeprefix("torch.")
    return PRECISION_DTYPES.get(name, name if name in INPUT_DTYPES | ENGINE_DTYPES else None)


def model_dtype(precision: str) -> str:
    """The floating dtype a model is cast to for compile.precision (int8 and fp8 keep float32)."""
    return QUANTIZED_PRECISIONS.get(precision) or PRECISION_DTYPES[precision]


def compute_dtype(precision: str) -> str:
    """The dtype an engine computes in for compile.precision ('int8' for int8, 'float8_e4m3fn' for fp8)."""
    return "int8" if precision == "int8" else PRECISION_DTYPES[precision]


def is_quantized(precision: str) -> bool:
    """True where build quantizes (int8, fp8) rather than export casting the model."""
    return precision in QUANTIZED_PRECISIONS


def input_dtype(name: str) -> str:
    """The torch name of an input tensor's dtype (input.tensors[].dtype), checked without torch.

    The job's process checks its inputs before any stage, and importing torch there would cost
    it seconds of CPU the stage worker pays anyway.
    """
    from pipeline.errors import ConfigError

    canon = canonical(name)
    if canon not in INPUT_DTYPES:
        choices = sorted(INPUT_DTYPES | {p for p, d in PRECISION_DTYPES.items() if d in INPUT_DTYPES})
        raise ConfigError(f"dtype {name!r} (input.tensors[].dtype) is not a known dtype.",
                          f"use one of {', '.join(choices)}.")
    return canon


def torch_dtype(name: str):
    """The torch.dtype of an input tensor's dtype name (input.tensors[].dtype)."""
    import torch

    return getattr(torch, input_dtype(name))


def name_of(dtype) -> str:
    """'float16' for torch.float16: how artifacts write a dtype."""
    return str(dtype).removeprefix("torch.")


def tensorrt_name(trt_dtype) -> str:
    """A TensorRT DataType as a torch dtype name."""
    return TENSORRT_DTYPES.get(trt_dtype.name, trt_dtype.name.lower())


def precisions_of(dtypes) -> list[str]:
    """The precisions ('fp16', ...) among dtype names, sorted."""
    return sorted({DTYPE_PRECISIONS[d] for d in dtypes if d in DTYPE_PRECISIONS})


def graph_precisions(gm) -> list[str]:
    """The float precisions the graph's ops compute in, from the dtypes of their outputs.

    Engines that describe no network of their own (ONNX Runtime, Inductor) were built
    from exactly this graph, so these are the precisions they compute in.
    """
    import torch

    return precisions_of({name_of(v.dtype) for n in gm.graph.nodes if n.op == "call_function"
                          for v in [n.meta.get("val")] if isinstance(v, torch.Tensor)})
