"""Convert: each accelerated segment to the target's IR (ONNX for the ONNX-based targets).

For dynamic inputs the program runs at every corner export traced (min, opt, max, extra
profiles) so each segment knows its own input shapes there: they become its dynamic axes
and its TensorRT optimization profiles.
"""

from __future__ import annotations

from pipeline import programs, segments
from pipeline.stage import Metrics, StageContext
from pipeline.store import load_json, write_json
from stages.export import load_example

NAME = "convert"
VERSION = 3
INPUTS = ("export", "lower", "partition")
# Of partition only the recipe matters: equal splits share this stage across min_block_size values.
CONTENT = {"partition": ("recipe.json",)}
READS = ("target", "compile.precision", "compile.truncate_long_and_double")


def run(ctx: StageContext) -> Metrics:
    recipe = load_json(ctx.inputs["partition"] / "recipe.json", "partition recipe")
    fused = segments.fuse(ctx.target.graph_module(programs.load(ctx.inputs["lower"])), recipe)
    captured = {key: segments.capture_inputs(fused, sample)
                for key, sample in load_example(ctx.inputs["export"]).items()}
    converted = []
    truncate = ctx.config.compile.truncate_long_and_double and ctx.target.name != "torch_tensorrt"
    for name, _ in segments.accelerated(fused):
        module, args = fused.get_submodule(name), captured["opt"][name]
        if truncate:  # Torch-TensorRT truncates inside its own converters
            args = segments.truncate_double(module, args)
        with ctx.console.status(f"converting {name} for {ctx.target.name}"):
            entry = ctx.target.convert(name, module, args, ctx.out, ctx.config.compile,
                                       profiles=segments.input_profiles(captured, name))
        converted.append({**entry, "truncated_double": bool(truncate)})
    write_json(ctx.out / "segments.json", {"target": ctx.target.name, "segments": converted})
    size = sum(p.stat().st_size for p in ctx.out.iterdir())
    return {"num_converted_segments": len(converted), "converted_bytes": size}
