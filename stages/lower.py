"""Lower: the target's decompositions and passes, saved as a new program."""

from __future__ import annotations

from pipeline import programs
from pipeline.segments import count_ops
from pipeline.stage import Metrics, StageContext
from pipeline.store import write_json

NAME = "lower"
VERSION = 2
INPUTS = ("export",)
READS: tuple[str, ...] = ()
# Not target.name: targets that lower alike (onnxruntime, tensorrt) share the lowered program.
TARGET_KEYS = ("lowering",)


def run(ctx: StageContext) -> Metrics:
    program = programs.load(ctx.inputs["export"])
    before = count_ops(program.graph.nodes)
    with ctx.console.status(f"lowering for {ctx.target.name}"):
        lowered = ctx.target.lower(program)
    after = count_ops(lowered.graph.nodes)
    programs.save(lowered, ctx.out, imports=programs.imports_of(ctx.inputs["export"]))
    write_json(ctx.out / "ops.json", {"before": dict(sorted(before.items())), "after": dict(sorted(after.items()))})
    return {"ops_before_lowering": sum(before.values()), "ops_after_lowering": sum(after.values())}
