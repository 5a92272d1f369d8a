"""Lower: the target's decompositions and passes, saved as a new program."""

from __future__ import annotations

from pipeline import layout, programs
from pipeline.files import write_json
from pipeline.segments import count_ops
from pipeline.stage import Metrics, StageContext, StageSpec
from pipeline.targets import LOWERING

FILES = layout.LOWER


def run(ctx: StageContext) -> Metrics:
    program = programs.load(ctx.inputs["export"])
    before = count_ops(program.graph.nodes)
    with ctx.console.status(f"lowering for {ctx.target.name}"):
        lowered = ctx.target.lower(program)
    after = count_ops(lowered.graph.nodes)
    # What export recorded, and the modules of any pytree type lowering introduced.
    imports = {*programs.imports_of(ctx.inputs["export"]), *programs.type_modules(lowered)}
    programs.save(lowered, ctx.out, imports=imports)
    write_json(ctx.out / FILES.ops, {"before": dict(sorted(before.items())), "after": dict(sorted(after.items()))})
    return {"ops_before_lowering": sum(before.values()), "ops_after_lowering": sum(after.values())}


# Keyed by what the target's lowering does, not its name: targets that lower alike
# (onnxruntime, tensorrt) share the lowered program.
SPEC = StageSpec(name="lower", version=2, run=run, inputs=("export",), asks=LOWERING, writes=FILES)
