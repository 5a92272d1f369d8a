"""Int8 (and fp8) quantization with each field's own tools, behind one small request.

Build hands a target's build() one `QuantizeRequest` per segment (in the segment dict,
under "quantize"): the segment's calibration inputs, the method, per-channel weights and
the layers to keep in fp32. The target quantizes with its own tool (onnxruntime: ORT's
static QDQ quantization, pipeline.quantize.ort_qdq; tensorrt: a QDQ graph it builds as
a strongly typed INT8 engine) and reports what runs in int8. A target says it can
quantize through its class attribute `quantizer` (a line saying with what); one without
it is refused in one line before any stage runs (pipeline.calibration.check), and so is a
job whose settings its quantizer cannot serve (the classmethod `int8_refusal(config)`:
inductor quantizes with PT2E on the CPU, pipeline.quantize.pt2e, and with torchao on CUDA,
pipeline.quantize.torchao_gpu). compile.precision=fp8 takes the same route through
`fp8_quantizer`/`fp8_refusal` (tensorrt: an FP8 QDQ graph built as a strongly typed engine;
inductor: torchao's fp8 linears on compute capability 8.9+); a target without it may say why in `no_fp8`.

The accuracy-aware rounds that wrap those builds are pipeline.quantize.loop.
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
                "excluded": list(self.exclude), "op_types": list(self.op_types)}


# compile.precision -> the target class attribute saying how it quantizes to it (a line), and the
# attribute saying why it cannot (a line, else the generic reason below).
QUANTIZER_ATTRIBUTES = {"int8": ("quantizer", "no_int8"), "fp8": ("fp8_quantizer", "no_fp8")}


def quantizer_of(target_name: str, precision: str = "int8") -> tuple[str | None, str | None]:
    """(how the target quantizes to `precision`, None) or (None, why it cannot): from its class attributes."""
    from pipeline import targets

    registry = targets.registry()
    cls = targets.target_class(target_name)
    attribute, why_not = QUANTIZER_ATTRIBUTES[precision]
    quantizer = getattr(cls, attribute, None)
    if quantizer:
        return quantizer, None
    able = sorted(name for name, c in registry.items() if getattr(c, attribute, None))
    reason = getattr(cls, why_not, None)
    return None, reason or (f"it has no {precision} quantizer in this pipeline (targets that quantize to "
                            f"{precision}: {', '.join(able)}); it would build fp32 engines")


def int8_refusal(target_name: str, config: dict[str, Any], precision: str = "int8") -> tuple[str, str] | None:
    """(why not, the fix) when the target's quantizer cannot serve this job's settings; None when it can.

    quantize.mode=dynamic needs a target with a `dynamic_quantizer` (onnxruntime) and int8; then the
    target's classmethod `int8_refusal(config)` (or `fp8_refusal` for compile.precision=fp8) decides.
    """
    from pipeline import targets
    from pipeline.dtypes import choice_name

    cls = targets.target_class(target_name)
    mode = choice_name(config["quantize"]["mode"])
    if mode == "dynamic" and (precision != "int8" or not getattr(cls, "dynamic_quantizer", None)):
        able = sorted(name for name, c in targets.registry().items() if getattr(c, "dynamic_quantizer", None))
        return (f"quantize.mode=dynamic (activation scales at run time) is {', '.join(able)}'s int8 route, and "
                f"{target_name} {'has no dynamic quantizer' if precision == 'int8' else 'would build ' + precision}",
                f"set quantize.mode=static, or use target={able[0] if able else 'onnxruntime'} with int8")
    if mode == "weight_only" and (precision != "int8" or not cls.weight_only_quantizer):
        able = sorted(name for name, c in targets.registry().items() if c.weight_only_quantizer)
        return (f"quantize.mode=weight_only (int8 weights, float compute) is {', '.join(able)}'s int8 route on "
                f"CUDA, and {target_name} {'has none' if precision == 'int8' else 'would build ' + precision}",
                "set quantize.mode=static, or use target=inductor target.device=cuda with int8")
    refusal = getattr(cls, f"{precision}_refusal", None)
    return refusal(config) if refusal else None


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
