"""Torch-TensorRT's documented int8 route, thin: Model Optimizer fake-quantizes the module before export.

Torch-TensorRT (examples/dynamo/vgg16_ptq.py) quantizes the nn.Module with
`modelopt.torch.quantization.quantize(model, INT8_DEFAULT_CFG, forward_loop)`, exports it
inside `export_torch_mode()` and compiles the program; from TensorRT 11 the network is
strongly typed and takes int8 from the quantize ops in the graph. Wiring it into the
pipeline needs the export stage to call `quantize_module` for targets that quantize the
module (torch_tensorrt): not done yet, so `target=torch_tensorrt compile.precision=int8` is
refused in one line (pipeline.calibration.check). torch_tensorrt cannot be installed on the
CPU machine this was written on; the module half runs on CPU where modelopt imports.
"""

from __future__ import annotations

import contextlib


def quantize_module(model, batches, method: str = "minmax"):
    """The model with modelopt's int8 fake-quantizers, calibrated (max) on `batches` (pipeline Samples)."""
    import modelopt.torch.quantization as mtq
    import torch

    from pipeline.errors import ConfigError

    if method != "minmax":
        raise ConfigError(f"modelopt's torch int8 recipe calibrates with max (minmax), not {method}.",
                          "set calibration.method=minmax for target=torch_tensorrt.")

    def forward_loop(module):
        with torch.no_grad():
            for sample in batches:
                sample(module)

    return mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)


def export_context():
    """Where torch.export must run so modelopt's quantizers trace as quantize ops TensorRT reads."""
    try:
        from modelopt.torch.quantization.utils import export_torch_mode
    except ImportError:
        return contextlib.nullcontext()
    return export_torch_mode()
