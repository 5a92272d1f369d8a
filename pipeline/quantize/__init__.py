"""Int8 (and fp8) quantization tools, below the targets: each transforms a graph and imports no target.

This package is a layer: ORT's static and dynamic QDQ (ort_qdq), TensorRT's QDQ graphs
(tensorrt_qdq), NVIDIA Model Optimizer on the module (torch_modelopt), PyTorch's PT2E
(pt2e) and per-layer sensitivity (sensitivity, pt2e_sensitivity). Targets call them;
they never import pipeline.targets or pipeline.hybrid (tests/test_architecture.py).

Build hands a target's build() one `QuantizeRequest` per segment (in the segment dict,
under "quantize"): the segment's calibration inputs, the method, per-channel weights and
the layers to keep in fp32. Which targets quantize, to what and when they refuse is
declared on the Target protocol (Target.quantizers, quantizer_refusal); the accuracy-aware
rounds that wrap the builds are pipeline.quantized_build, beside the build stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class QuantizeRequest:
    """What a target's build() needs to quantize one segment (in memory: never written to engines.json)."""

    # Per calibration batch, the segment's inputs in its ONNX input order (numpy arrays).
    inputs: list[tuple] = field(default_factory=list)
    method: str = "minmax"
    per_channel: bool = True
    # Layers kept in fp32: ONNX node names (onnxruntime, tensorrt), module paths (inductor, PT2E).
    exclude: list[str] = field(default_factory=list)
    # ONNX op types to quantize (empty: the tool's default).
    op_types: list[str] = field(default_factory=list)
    # static (calibrated activation ranges) or dynamic (activation scales at run time).
    mode: str = "static"
    # SmoothQuant's migration strength (pipeline.quantize.smooth); None: activations as they are.
    smooth_alpha: float | None = None
    # Scratch folder for intermediate models (pre-processed fp32), outside the cached output.
    workdir: Path = Path(".")

    @property
    def example(self) -> tuple | None:
        """One calibration batch: the real sizes of a segment whose inputs are dynamic (MAC counts)."""
        return self.inputs[0] if self.inputs else None

    def summary(self) -> dict[str, Any]:
        """What engines.json records of the request: the settings, not the data."""
        return {"mode": self.mode, "method": self.method, "per_channel": self.per_channel,
                "num_batches": len(self.inputs),
                "excluded": list(self.exclude), "op_types": list(self.op_types), "smooth_alpha": self.smooth_alpha}


def strip(entry: dict[str, Any]) -> dict[str, Any]:
    """A built segment's entry with its request replaced by the request's summary (JSON-safe)."""
    request = entry.get("quantize")
    if isinstance(request, QuantizeRequest):
        entry = {**entry, "quantize": request.summary()}
    return entry


def replace(request: QuantizeRequest, **changes) -> QuantizeRequest:
    return dataclasses.replace(request, **changes)


def as_precision(fractions: dict[str, Any], precision: str) -> dict[str, Any]:
    """int8 fraction counts under `precision`'s names (fp8_ops, fp8_mac_fraction, ...)."""
    return {k.replace("int8", precision): v for k, v in fractions.items()}


def int8_facts(qdq: Path, tool: str, precision: str = "int8", example: tuple | None = None,
               requantized: bool = True) -> dict[str, Any]:
    """engines.json facts of a QDQ model any target built: its file, the tool, the quantized fractions.

    `requantized`: an op counts as int8 only where its output is quantized again (ORT's QLinear
    fusion); TensorRT needs quantized inputs only (ort_qdq.int8_fractions). An fp8 QDQ model's
    fractions are under "fp8", with fp8_ names (fp8_op_fraction, fp8_mac_fraction, ...).
    """
    from pipeline.quantize.ort_qdq import int8_fractions

    fractions = as_precision(int8_fractions(qdq, example, requantized), precision)  # example: for dynamic sizes
    return {"qdq_model": qdq.name, "quantizer": tool, precision: fractions}
