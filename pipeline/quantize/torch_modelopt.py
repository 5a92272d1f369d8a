"""Torch-TensorRT's documented int8/fp8 route, thin: Model Optimizer fake-quantizes the module before export.

Torch-TensorRT (examples/dynamo/vgg16_ptq.py) quantizes the nn.Module with
`modelopt.torch.quantization.quantize(model, INT8_DEFAULT_CFG, forward_loop)` (FP8_DEFAULT_CFG
for fp8), exports it inside `export_torch_mode()`, where each enabled quantizer traces as one
`tensorrt::quantize_op` node, and compiles the program: its `aten_ops_quantize_op` converter
makes TensorRT Quantize/Dequantize layers, and the strongly typed network runs the layers
they feed in int8 (fp8). The export stage does the first two steps for targets that quantize
the module (Target.quantizes_module), with the job's calibration batches.

Torch-TensorRT registers that converter at import only if modelopt's op exists by then; every
stage loads its program first, importing modelopt from imports.json (pipeline.programs), and
only then calls into Torch-TensorRT, so the order holds in the stage worker.

modelopt's quantizers call that op only on CUDA tensors (on the CPU they run a Python
fake-quantizer that torch.export cannot trace), so this route needs a GPU; the module
half (calibrated fake-quantizers) runs on the CPU too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
from typing import Any

from pipeline.errors import CompileError, ConfigError, first_line

# compile.precision -> modelopt's recipe and the quantize_op's exponent bits (int8: 0; E4M3: 4).
RECIPES = {"int8": ("INT8_DEFAULT_CFG", 0), "fp8": ("FP8_DEFAULT_CFG", 4)}
# Ops between a quantize_op and the layer that reads it that move no value (a linear's weight transposed).
SHAPE_OPS = {"permute", "t", "transpose", "view", "reshape", "_unsafe_view", "expand", "clone", "contiguous"}
INSTALL = "pip install -e '.[quant]' (nvidia-modelopt 0.47)"


@functools.cache
def unavailable() -> str | None:
    """None where modelopt's torch quantization imports, else why not."""
    try:
        importlib.import_module("modelopt.torch.quantization")
    except Exception as err:  # a missing or broken install
        return f"modelopt.torch.quantization does not import ({first_line(err)})"
    return None


def refusal(config: dict[str, Any], precision: str) -> tuple[str, str] | None:
    """(why not, the fix) when this job's settings cannot take the module route; None when they can."""

    why = unavailable()
    if why:
        return f"its {precision} route (modelopt's mtq.quantize before export) needs nvidia-modelopt: {why}", INSTALL
    cal, quantize = config["calibration"], config["quantize"]
    if cal["method"] != "minmax":
        return (f"modelopt's {RECIPES[precision][0]} calibrates with max (each tensor's range), not "
                f"calibration.method={cal['method']}", "set calibration.method=minmax")
    if not cal["per_channel"] and precision == "int8":
        return ("modelopt's int8 recipe quantizes weights per channel", "leave calibration.per_channel=true")
    if quantize["op_types"]:
        return ("quantize.op_types names ONNX op types, which the module route does not have",
                "leave quantize.op_types empty (quantize.exclude takes module paths here)")
    return None


def recipe(precision: str, exclude: list[str]) -> dict[str, Any]:
    """modelopt's default config for `precision`, with the quantizers of `exclude` (module paths) turned off.

    The later entries of quant_cfg win, so the exclusions go last.
    """
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, RECIPES[precision][0]))
    cfg["quant_cfg"] = [*cfg["quant_cfg"], *({"quantizer_name": f"{path}.*", "enable": False} for path in exclude)]
    return cfg


def quantize_module(model, batches, precision: str = "int8", exclude: list[str] | None = None):
    """The model with modelopt's fake-quantizers, calibrated (max) on `batches` (pipeline Samples, on its device).

    A path in `exclude` that names no module would match no quantizer and quantize the layer
    it meant to keep, silently: it is refused, with paths that exist.
    """
    import modelopt.torch.quantization as mtq
    import torch

    names = dict(model.named_modules())
    unknown = [path for path in exclude or [] if path not in names]
    if unknown:
        layers = [n for n, m in names.items() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        raise ConfigError(f"quantize.exclude names {', '.join(unknown)}, which the model has no module for.",
                          f"name modules by path, e.g. {', '.join(layers[:6])}{' ...' if len(layers) > 6 else ''}.")

    def forward_loop(module):
        with torch.no_grad():
            for sample in batches:
                sample(module)

    try:
        return mtq.quantize(model, recipe(precision, list(exclude or [])), forward_loop=forward_loop)
    except Exception as err:  # modelopt and the model's own forward raise many types
        raise CompileError(f"modelopt could not quantize the model to {precision}: {first_line(err)}",
                           "keep the failing module in fp32 with quantize.exclude, or use compile.precision=fp32.") from err


def record(model, precision: str) -> dict[str, Any]:
    """What export.json keeps of the quantization: the tool, the recipe, how many quantizers are on."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    from pipeline import env

    states = [m.is_enabled for m in model.modules() if isinstance(m, TensorQuantizer)]
    return {"tool": f"nvidia-modelopt {env.library_version('nvidia-modelopt')}", "recipe": RECIPES[precision][0],
            "quantizers_enabled": sum(states), "quantizers_disabled": len(states) - sum(states)}


def export_context():
    """Where torch.export must run so modelopt's quantizers trace as quantize ops TensorRT reads."""
    try:
        from modelopt.torch.quantization.utils import export_torch_mode
    except ImportError:
        return contextlib.nullcontext()
    return export_torch_mode()


def fractions(gm, precision: str = "int8") -> dict[str, Any]:
    """Of the graph's compute ops: how many, and how many MACs, read `precision` through quantize ops.

    TensorRT runs a layer in int8 (fp8) when its data and weight come through Quantize/
    Dequantize; a quantize_op is both, its exponent bits telling int8 (0) from E4M3 (4).
    """
    from pipeline.quantize import as_precision
    from pipeline.quantize.pt2e import int8_fractions, opname

    bits = RECIPES[precision][1]

    def quantized(node) -> bool:
        while hasattr(node, "op") and opname(node) in SHAPE_OPS:
            node = node.args[0]
        if not hasattr(node, "op") or opname(node) != "quantize_op":
            return False
        return node.kwargs.get("exponent_bits", node.args[3] if len(node.args) > 3 else None) == bits

    return as_precision(int8_fractions(gm, quantized), precision)
