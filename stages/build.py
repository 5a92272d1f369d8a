"""Build: one engine per converted segment, each written to disk with a description."""

from __future__ import annotations

from pipeline.stage import Metrics, StageContext
from pipeline.store import load_json, write_json

NAME = "build"
VERSION = 1
INPUTS = ("convert",)
READS = ("target", "compile.optimization_level", "compile.workspace_size", "compile.precision")

ENGINES = "engines.json"


def run(ctx: StageContext) -> Metrics:
    converted = load_json(ctx.inputs["convert"] / "segments.json", "converted segments")
    engines = []
    for segment in converted["segments"]:
        with ctx.console.status(f"building {segment['name']} with {ctx.target.name}"):
            engines.append(ctx.target.build(segment, ctx.inputs["convert"], ctx.out, ctx.config.compile))
    write_json(ctx.out / ENGINES, {"target": ctx.target.name, "settings": ctx.target.settings,
                                  "segments": engines})
    engine_bytes = sum(p.stat().st_size for p in ctx.out.iterdir() if p.name != ENGINES)
    return {"num_engines": len(engines), "engine_bytes": engine_bytes}
