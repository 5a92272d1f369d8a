"""Partition: which ops the target runs, and which stay in PyTorch and why.

torch.fx's CapabilityBasedPartitioner proposes the largest acyclic blocks of ops the
target supports; the semantics on top follow Torch-TensorRT: blocks with fewer than
`min_block_size` ops stay in PyTorch, ops named in `torch_executed_ops` always do, and
`require_full_compilation` turns any op left in PyTorch into an error. The output is a
report users read (and sweep `min_block_size` to change) plus a recipe later stages
re-apply to the same lowered program.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline import layout, ops, programs, segments
from pipeline.dtypes import graph_precisions
from pipeline.errors import CompileError
from pipeline.files import write_json
from pipeline.stage import Metrics, StageContext, StageSpec
from pipeline.targets import PARTITIONING

FILES = layout.PARTITION


def target_support(target, executed: set[str]):
    """The partitioner's view of the target: supported unless the user keeps the op in torch.

    The class is made here, not at the top: torch.fx imports torch, and the job's process
    reads this module's SPEC without importing torch (the stage worker runs the stage).
    """
    from torch.fx.passes.operator_support import OperatorSupportBase

    class TargetSupport(OperatorSupportBase):
        def is_node_supported(self, submodules, node) -> bool:
            if segments.is_compute(node) and segments.op_name(node) in executed:
                return False
            return target.is_supported(node)

    return TargetSupport()


def propose(gm, target, executed: set[str], min_block_size: int, full: bool) -> list[list]:
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner

    partitioner = CapabilityBasedPartitioner(gm, target_support(target, executed),
                                             allows_single_node_partition=True)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    blocks = []
    for partition in partitioner.propose_partitions():
        nodes = sorted(partition.nodes, key=order.__getitem__)
        size = sum(1 for n in nodes if segments.is_compute(n))
        if size and (full or size >= min_block_size):
            blocks.append(nodes)
    return sorted(blocks, key=lambda nodes: order[nodes[0]])


def kept_reason(node, target, executed: set[str], min_block_size: int) -> str:
    if segments.op_name(node) in executed:
        return "listed in compile.torch_executed_ops"
    if not target.is_supported(node):
        return f"unsupported by {target.name}: {target.unsupported_reason(node)}"
    return f"in a block smaller than min_block_size={min_block_size}"


def describe(fused, accel_ops: dict[str, Counter]) -> list[dict[str, Any]]:
    """Segments in execution order: accelerated submodules and the PyTorch runs between them."""
    out: list[dict[str, Any]] = []
    torch_run: list = []

    def flush():
        ops = segments.count_ops(torch_run)
        if ops:
            out.append({"name": f"torch_{sum(s['kind'] == 'torch' for s in out)}", "kind": "torch",
                        "op_count": sum(ops.values()), "ops": dict(sorted(ops.items()))})
        torch_run.clear()

    for node in fused.graph.nodes:
        if node.op == "call_module" and node.target in accel_ops:
            flush()
            sub = fused.get_submodule(node.target)
            ops = accel_ops[node.target]
            out.append({
                "name": node.target, "kind": "accelerated", "op_count": sum(ops.values()),
                "ops": dict(sorted(ops.items())),
                "inputs": [segments.describe_value(n) for n in sub.graph.nodes if n.op == "placeholder"],
                "outputs": [segments.describe_value(n) for n in sub.graph.output_node().args[0]],
            })
        elif segments.is_compute(node):
            torch_run.append(node)
    flush()
    return out


def run(ctx: StageContext) -> Metrics:
    cfg = ctx.config.compile
    executed = ops.resolve(list(cfg.torch_executed_ops))
    program = programs.load(ctx.inputs["lower"])
    gm = ctx.target.graph_module(program)
    total = segments.count_ops(gm.graph.nodes)
    for name in sorted(executed):
        if name not in total and not any(n.startswith(name.rsplit(".", 1)[0] + ".") for n in total):
            ctx.warn(f"torch_executed_ops: {name} does not occur in this model")
    blocks = find_blocks(gm, ctx.target, executed, cfg)
    recipe = [{"name": f"{segments.ACCEL_PREFIX}{i}", "nodes": [n.name for n in block]}
              for i, block in enumerate(blocks)]
    accel_ops = {r["name"]: segments.count_ops(block) for r, block in zip(recipe, blocks, strict=False)}
    kept = kept_nodes(gm, {n for block in blocks for n in block}, ctx.target, executed, cfg.min_block_size)
    by_op = group_kept(kept)
    if cfg.require_full_compilation and kept:
        summary = ", ".join(f"{op} x{v['count']} ({next(iter(v['reasons']))})" for op, v in sorted(by_op.items()))
        raise CompileError(
            f"require_full_compilation=true but {len(kept)} ops would stay in PyTorch: {summary}.",
            "remove those ops from compile.torch_executed_ops, or set compile.require_full_compilation=false.",
        )
    described = describe(segments.fuse(ctx.target.graph_module(program), recipe), accel_ops)
    report = {
        "target": ctx.target.name,
        "settings": {"min_block_size": cfg.min_block_size, "torch_executed_ops": sorted(executed),
                     "require_full_compilation": cfg.require_full_compilation},
        "totals": totals(total, accel_ops, described, recipe),
        "segments": described,
        "kept_in_torch": {op: {"count": v["count"], "reasons": dict(v["reasons"])} for op, v in sorted(by_op.items())},
        "kept_nodes": kept,
        # validate reports these as the precision achieved where engines describe no network
        "graph_precisions": graph_precisions(gm),
    }
    write_json(ctx.out / FILES.report, report)
    write_json(ctx.out / FILES.recipe, recipe)
    print_summary(ctx.console, report)
    t = report["totals"]
    return {"num_segments": t["segments"], "num_accelerated_segments": t["accelerated_segments"],
            "accelerated_op_fraction": t["accelerated_op_fraction"], "num_ops": t["ops"],
            "num_torch_ops": t["torch_ops"]}


def find_blocks(gm, target, executed: set[str], cfg) -> list[list]:
    """The accelerated blocks: the target's own partitioner where it has one, else ours."""
    own = target.partition(gm)
    if own is None:
        return propose(gm, target, executed, cfg.min_block_size, cfg.require_full_compilation)
    # The target's partitioner applied min_block_size and torch_executed_ops itself.
    by_name = {n.name: n for n in gm.graph.nodes}
    return [[by_name[name] for name in block] for block in own]


def kept_nodes(gm, in_blocks: set, target, executed: set[str], min_block_size: int) -> list[dict[str, str]]:
    return [{"node": node.name, "op": segments.op_name(node),
             "reason": kept_reason(node, target, executed, min_block_size)}
            for node in gm.graph.nodes if segments.is_compute(node) and node not in in_blocks]


def group_kept(kept: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    by_op: dict[str, dict[str, Any]] = {}
    for item in kept:
        entry = by_op.setdefault(item["op"], {"count": 0, "reasons": Counter()})
        entry["count"] += 1
        entry["reasons"][item["reason"]] += 1
    return by_op


def totals(total: Counter, accel_ops: dict[str, Counter], described: list, recipe: list) -> dict[str, Any]:
    n_total = sum(total.values())
    n_accel = sum(sum(c.values()) for c in accel_ops.values())
    return {
        "ops": n_total, "accelerated_ops": n_accel, "torch_ops": n_total - n_accel,
        "segments": len(described), "accelerated_segments": len(recipe),
        "torch_segments": sum(s["kind"] == "torch" for s in described),
        "accelerated_op_fraction": round(n_accel / n_total, 6) if n_total else 0.0,
    }


def print_summary(console, report: dict[str, Any]) -> None:
    t = report["totals"]
    console.print(f"partition: {t['accelerated_ops']}/{t['ops']} ops on {report['target']} "
                  f"in {t['accelerated_segments']} segment(s); {t['torch_ops']} op(s) in PyTorch "
                  f"in {t['torch_segments']} segment(s)", markup=False)
    for op, info in report["kept_in_torch"].items():
        reasons = "; ".join(f"{r} x{c}" for r, c in info["reasons"].items())
        console.print(f"  kept in PyTorch: {op} x{info['count']} - {reasons}", markup=False)  # op names as they are


SPEC = StageSpec(
    name="partition", version=2, run=run, inputs=("lower",),
    reads=("compile.min_block_size", "compile.torch_executed_ops", "compile.require_full_compilation"),
    asks=PARTITIONING, writes=FILES,
)
