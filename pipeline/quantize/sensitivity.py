"""Which layers cost the accuracy: per-layer sensitivity of a QDQ model against its fp32 model.

ONNX Runtime's own debugging tools (`onnxruntime.quantization.qdq_loss_debug`) save every
intermediate tensor of both models on the same inputs. A layer's harm is the noise it
adds itself: the quantization noise at its output (fp32 vs int8 at the same tensor) less
the noise already in its inputs (noise powers add). A layer fed by a tensor with huge
outliers (one scale for the whole tensor rounds the ordinary values to zero) adds a lot
right there, while errors that only flow through a layer do not count against it. The worst layers are
kept in fp32 next round.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.quantize.ort_qdq import FLOAT_COMPUTE, Reader, input_names

# SQNR of a tensor that int8 reproduces exactly (graph inputs): a finite ceiling.
EXACT_DB = 120.0
# Activations ORT's QDQ quantizer folds into the layer before them (the layer's output takes their name).
FUSED_ACTIVATIONS = {"Relu", "Clip"}


def activations(model: Path, inputs: list[tuple], workdir: Path) -> dict[str, list]:
    """Every intermediate tensor of `model` on `inputs` (ORT's augmented-model route)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        modify_model_output_intermediate_tensors,
    )

    augmented = workdir / f"{model.stem}.debug.onnx"
    modify_model_output_intermediate_tensors(str(model), str(augmented))
    try:
        return collect_activations(str(augmented), Reader(input_names(model), inputs))
    finally:
        augmented.unlink(missing_ok=True)


def sqnr(reference: list, got: list) -> float:
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    value = compute_signal_to_quantization_noice_ratio(reference, got)
    return min(value, EXACT_DB) if math.isfinite(value) else EXACT_DB


def rank(float_model: Path, qdq_model: Path, inputs: list[tuple], excluded: list[str],
         workdir: Path) -> list[tuple[str, float]]:
    """(layer, SQNR in dB of the noise it adds) of the compute layers (Conv, MatMul, Gemm), worst first.

    Only compute layers are candidates: ranking every node kind was tried on BERT-base, where
    it picked the attention mask's Where nodes (huge fill values, harmless after Softmax).
    """
    import onnx

    fp32 = activations(float_model, inputs, workdir)
    int8 = activations(qdq_model, inputs, workdir)
    graph = onnx.load(str(float_model), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type not in FLOAT_COMPUTE or node.name in excluded:
            continue
        out = _output(node.output[0], consumers, int8)
        if out is None or out not in fp32:
            continue
        feeding = [sqnr(fp32[i], int8[i]) for i in node.input if i and i not in weights and i in fp32 and i in int8]
        found.append((node.name, added_noise_db(min(feeding, default=EXACT_DB), sqnr(fp32[out], int8[out]))))
    return sorted(found, key=lambda item: item[1])


def added_noise_db(before: float, after: float) -> float:
    """SQNR of the noise a layer adds: noise powers add, so its own is the output's less the input's."""
    own = 10 ** (-after / 10) - 10 ** (-before / 10)
    return EXACT_DB if own <= 0 else min(EXACT_DB, -10 * math.log10(own))


def _output(name: str, consumers: dict[str, list], int8: dict[str, list]) -> str | None:
    """The layer's output as the QDQ model names it: quantization fuses a following Relu/Clip into it."""
    while name not in int8:
        after = consumers.get(name, [])
        if len(after) != 1 or after[0].op_type not in FUSED_ACTIVATIONS:
            return None
        name = after[0].output[0]
    return name
