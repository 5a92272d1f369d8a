"""Convert: each accelerated segment to the target's IR (ONNX for the ONNX-based targets)."""

from __future__ import annotations

import torch

from pipeline import programs, segments
from pipeline.stage import Metrics, StageContext
from pipeline.store import load_json, write_json

NAME = "convert"
VERSION = 1
INPUTS = ("export", "lower", "partition")
READS = ("target", "compile.precision")


def run(ctx: StageContext) -> Metrics:
    recipe = load_json(ctx.inputs["partition"] / "recipe.json", "partition recipe")
    fused = segments.fuse(ctx.target.graph_module(programs.load(ctx.inputs["lower"])), recipe)
    example = torch.load(ctx.inputs["export"] / "example_inputs.pt")
    captured = segments.capture_inputs(fused, example)
    converted = []
    for name, _ in segments.accelerated(fused):
        with ctx.console.status(f"converting {name} for {ctx.target.name}"):
            converted.append(ctx.target.convert(name, fused.get_submodule(name), captured[name],
                                                ctx.out, ctx.config.compile))
    write_json(ctx.out / "segments.json", {"target": ctx.target.name, "segments": converted})
    size = sum(p.stat().st_size for p in ctx.out.iterdir())
    return {"num_converted_segments": len(converted), "converted_bytes": size}
