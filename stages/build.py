"""Build: one engine per converted segment, each written to disk with a description.

Targets with a format for the whole compiled program (torch_tensorrt.save) also get the
assembled hybrid module to save, so a run's build folder is what users deploy.
"""

from __future__ import annotations

from pipeline import hybrid
from pipeline.stage import Metrics, StageContext
from pipeline.store import load_json, write_json
from pipeline.targets import Target
from stages.export import load_example

NAME = "build"
VERSION = 2
INPUTS = ("export", "lower", "partition", "convert")
# Of partition only the recipe matters (for the packaged program).
CONTENT = {"partition": ("recipe.json",)}
READS = ("target", "compile.optimization_level", "compile.workspace_size", "compile.precision")

ENGINES = "engines.json"


def run(ctx: StageContext) -> Metrics:
    converted = load_json(ctx.inputs["convert"] / "segments.json", "converted segments")
    engines = []
    for segment in converted["segments"]:
        with ctx.console.status(f"building {segment['name']} with {ctx.target.name}"):
            engines.append(ctx.target.build(segment, ctx.inputs["convert"], ctx.out, ctx.config.compile))
    listing = {"target": ctx.target.name, "settings": ctx.target.settings, "segments": engines}
    write_json(ctx.out / ENGINES, listing)
    if type(ctx.target).package is not Target.package:
        with ctx.console.status(f"saving the compiled program for {ctx.target.name}"):
            gm = hybrid.assemble(ctx.inputs["lower"], ctx.inputs["partition"], ctx.out)
            example = load_example(ctx.inputs["export"])["opt"].to(ctx.target.device())
            listing["package"] = ctx.target.package(gm, example, ctx.out)
        write_json(ctx.out / ENGINES, listing)
    engine_bytes = sum(p.stat().st_size for p in ctx.out.iterdir() if p.name != ENGINES)
    metrics = {"num_engines": len(engines), "engine_bytes": engine_bytes}
    seconds = [e["build_seconds"] for e in engines if "build_seconds" in e]
    if seconds:
        metrics["engine_build_seconds"] = sum(seconds)
    return metrics
