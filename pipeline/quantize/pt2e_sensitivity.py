"""Which layers cost the accuracy on the PT2E route: per-layer sensitivity of the quantized program.

The same measure as the ONNX route (pipeline.quantize.sensitivity): a layer's harm is the
noise it adds itself, the quantization noise at its output less the noise already in the
tensor it reads (noise powers add), in dB of SQNR. Both sides come from the quantized
program PT2E produced, run twice with torch.fx's Interpreter on the same inputs: as built
(every quantize/dequantize pair rounds its activation), and with those activation pairs
passed through, so each compute op sees the float activations it would see in fp32 (the
weights stay as quantized, BN folded: the graph is the same). A layer is named by the
module path PT2E's quantizer takes in `set_module_name_qconfig`, so the next round keeps
exactly that module in fp32.
"""

from __future__ import annotations

from typing import Any

from pipeline.quantize.pt2e import opname
from pipeline.quantize.sensitivity import EXACT_DB, added_noise_db

# Activation rounding: quantize then dequantize with one scale per tensor (weights are per channel).
QUANTIZE = ("quantize_per_tensor",)
DEQUANTIZE = ("dequantize_per_tensor",)


def module_path(node) -> str | None:
    """The module a compute op belongs to, as PT2E's quantizers name it (`layer1.0.conv2`)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "") or None


def activations(gm, args: tuple, rounding: bool, wanted: set[str]) -> dict[str, Any]:
    """Outputs of the `wanted` nodes on `args`, with activation rounding on or passed through."""
    import torch

    seen: dict[str, Any] = {}

    class Run(torch.fx.Interpreter):
        def run_node(self, node):
            if not rounding and opname(node).startswith(QUANTIZE):
                value = self.env[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else node.args[0]
            elif not rounding and opname(node).startswith(DEQUANTIZE) and node.args[0].op != "get_attr" \
                    and opname(node.args[0]).startswith(QUANTIZE):
                value = self.env[node.args[0]]
            else:
                value = super().run_node(node)
            if node.name in wanted:
                seen[node.name] = value.detach().double().flatten()
            return value

    with torch.no_grad():
        Run(gm).run(*args)
    return seen


def sqnr(reference, got) -> float:
    import math

    noise = float((reference - got).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if noise == 0 or signal == 0:
        return EXACT_DB
    return min(EXACT_DB, 10 * math.log10(signal / noise)) if math.isfinite(signal / noise) else EXACT_DB


def read_tensor(node):
    """The float tensor a compute op reads, before its input was rounded (through dequantize(quantize(x)))."""
    data = node.args[0]
    if opname(data).startswith(DEQUANTIZE) and opname(data.args[0]).startswith(QUANTIZE):
        return data.args[0].args[0]
    return data


def rank(program, inputs: list[tuple], compute: set[str], excluded: list[str]) -> list[tuple[str, float]]:
    """(module path, SQNR in dB of the noise its int8 version adds) of the quantized compute ops, worst first."""
    import numpy as np
    import torch

    gm = program.module()
    layers = {}
    for node in gm.graph.nodes:
        path = module_path(node) if opname(node) in compute else None
        if path and path not in excluded and opname(node.args[0]).startswith(DEQUANTIZE):
            layers[node.name] = (path, read_tensor(node).name)
    wanted = set(layers) | {read for _, read in layers.values()}
    noise: dict[str, list[tuple[float, float]]] = {}
    for batch in inputs:
        args = tuple(torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in batch)
        exact = activations(gm, args, rounding=False, wanted=wanted)
        rounded = activations(gm, args, rounding=True, wanted=wanted)
        for name, (path, read) in layers.items():
            before = sqnr(exact[read], rounded[read]) if read in exact else EXACT_DB
            noise.setdefault(path, []).append((before, sqnr(exact[name], rounded[name])))
    found = [(path, min(added_noise_db(b, a) for b, a in pairs)) for path, pairs in noise.items()]
    return sorted(found, key=lambda item: item[1])
