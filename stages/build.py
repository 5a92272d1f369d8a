"""Build: one engine per converted segment, each written to disk with a description.

Targets with a format for the whole compiled program (torch_tensorrt.save) also get the
assembled hybrid module to save, so a run's build folder is what users deploy.
"""

from __future__ import annotations

from pipeline import layout, shapes
from pipeline.dtypes import QUANTIZED_PRECISIONS
from pipeline.files import load_json, write_json
from pipeline.stage import INPUT_KEYS, Metrics, StageContext, StageSpec
from pipeline.targets import BUILDING

FILES = layout.BUILD


def run(ctx: StageContext) -> Metrics:
    converted = load_json(ctx.inputs["convert"] / layout.CONVERT.segments, "converted segments")
    engines, quantized = [], {}
    precision = ctx.config.compile.precision
    route = ctx.quantization
    if route == "segments":  # calibrated here, with the accuracy rounds
        from pipeline.quantized_build import build_int8

        engines, quantized = build_int8(ctx, converted["segments"])
    for segment in converted["segments"] if not quantized else []:
        with ctx.console.status(f"building {segment['name']} with {ctx.target.name}"):
            engines.append(ctx.target.build(segment, ctx.inputs["convert"], ctx.out, ctx.config.compile))
    if route == "module":  # quantized in export: its quantize ops are the engines'
        from pipeline.quantized_build import fractions

        quantized = fractions(engines, precision)
        if int(ctx.config.quantize.max_rounds):
            ctx.warn(f"{ctx.target.name} quantizes the module before export: the accuracy rounds do not run "
                     "(a round would be a new export); validate's gate decides, and quantize.exclude keeps "
                     "modules (paths such as layer1.0.conv2) in fp32")
    listing = {"target": ctx.target.name, "settings": ctx.target.build_settings(), "segments": engines}
    write_json(ctx.out / FILES.engines, listing)
    if ctx.target.saves_program:
        from pipeline import hybrid

        with ctx.console.status(f"saving the compiled program for {ctx.target.name}"):
            gm = hybrid.assemble(ctx.inputs["lower"], ctx.inputs["partition"], ctx.out, ctx.target)
            example = shapes.load_samples(ctx.inputs["export"] / layout.EXPORT.example)["opt"]
            listing["package"] = ctx.target.package(gm, example.to(ctx.target.device()), ctx.out)
        write_json(ctx.out / FILES.engines, listing)
    engine_bytes = sum(p.stat().st_size for p in ctx.out.iterdir() if p.name != FILES.engines)
    metrics = {"num_engines": len(engines), "engine_bytes": engine_bytes, **quantized}
    seconds = [e["build_seconds"] for e in engines if "build_seconds" in e]
    if seconds:
        metrics["engine_build_seconds"] = sum(seconds)
    return metrics


# Of partition only the recipe matters (for the packaged program).
SPEC = StageSpec(
    name="build", version=5, run=run, inputs=("export", "lower", "partition", "convert"),
    reads=("compile.optimization_level", "compile.workspace_size", "compile.precision"),
    # int8: the calibration data (by content: calibration.digest), the rounds and their gate.
    # int8 and fp8 go through the same rounds, each gated by its own tolerances.
    reads_when={("compile.precision", p): (*INPUT_KEYS, "model.task", "calibration", "data", "quantize",
                                           f"validate.tolerances.{p}", "validate.max_drop") for p in QUANTIZED_PRECISIONS},
    content={"partition": (layout.PARTITION.recipe,)}, asks=BUILDING, writes=FILES,
)
