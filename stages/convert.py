"""Convert: each accelerated segment to the target's IR (ONNX for the ONNX-based targets).

For dynamic inputs the program runs at every corner export traced (min, opt, max, extra
profiles) so each segment knows its own input shapes there: they become its dynamic axes
and its TensorRT optimization profiles.
"""

from __future__ import annotations

from pipeline import layout, programs, segments, shapes
from pipeline.files import load_json, write_json
from pipeline.stage import Metrics, StageContext, StageSpec
from pipeline.targets import CONVERTING

FILES = layout.CONVERT


def run(ctx: StageContext) -> Metrics:
    recipe = load_json(ctx.inputs["partition"] / layout.PARTITION.recipe, "partition recipe")
    fused = segments.fuse(ctx.target.graph_module(programs.load(ctx.inputs["lower"])), recipe)
    device = ctx.target.trace_device()  # where export traced: the program's weights live there
    captured = {key: segments.capture_inputs(fused, sample.to(device))
                for key, sample in shapes.load_samples(ctx.inputs["export"] / layout.EXPORT.example).items()}
    converted = []
    # Targets that truncate float64 inside their own converters get the segments unchanged.
    truncate = ctx.config.compile.truncate_long_and_double and not ctx.target.truncates_double
    for name, _ in segments.accelerated(fused):
        module, args = fused.get_submodule(name), captured["opt"][name]
        if truncate:
            args = segments.truncate_double(module, args)
        with ctx.console.status(f"converting {name} for {ctx.target.name}"):
            entry = ctx.target.convert(name, module, args, ctx.out, ctx.config.compile,
                                       profiles=segments.input_profiles(captured, name))
        converted.append({**entry, "truncated_double": bool(truncate)})
    write_json(ctx.out / FILES.segments, {"target": ctx.target.name, "segments": converted})
    size = sum(p.stat().st_size for p in ctx.out.iterdir())
    return {"num_converted_segments": len(converted), "converted_bytes": size}


# Of partition only the recipe matters: equal splits share this stage across min_block_size values.
SPEC = StageSpec(
    name="convert", version=3, run=run, inputs=("export", "lower", "partition"),
    reads=("compile.precision", "compile.truncate_long_and_double"),
    content={"partition": (layout.PARTITION.recipe,)}, asks=CONVERTING, writes=FILES,
)
