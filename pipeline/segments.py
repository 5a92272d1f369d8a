"""Graph segments: re-applying a partition recipe and describing what each segment holds.

The partition stage writes a recipe (node names per accelerated segment) instead of a
pickled graph; convert, validate and `pipeline.load` re-apply it to the lowered program
with torch.fx's own fuser, so every consumer sees the identical split. Fusing leaves the
weights a segment uses as inputs of its submodule; `inline_constants` moves them inside,
so exporters embed them as constants instead of taking them at every call.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

from pipeline.errors import ArtifactError

ACCEL_PREFIX = "accel_"


def assertions() -> set:
    """Runtime checks torch.export adds (dtype asserts of .to(), ranges of data-dependent sizes).

    torch.onnx erases the same set before converting (remove_assertion_nodes in its _fx_passes).
    """
    import torch

    aten = torch.ops.aten
    return {aten._assert_async.default, aten._assert_async.msg, aten._assert_scalar.default,
            aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default,
            aten.sym_constrain_range.default}


def is_symbolic(node) -> bool:
    """A size computation (aten.sym_size.int, operator.mul on SymInts...): yields a number, not a tensor."""
    import torch

    return node.op == "call_function" and isinstance(
        node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def is_compute(node) -> bool:
    """An operator call that counts toward block sizes (tuple indexing, sizes and checks do not)."""
    return (node.op == "call_function" and node.target is not operator.getitem
            and not is_symbolic(node) and node.target not in assertions())


def op_name(node) -> str:
    """Post-decomposition name as users write it in torch_executed_ops: aten.relu.default."""
    import torch

    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target).removeprefix("torch.ops.")
    module = getattr(node.target, "__module__", None) or ""
    return f"{module.removeprefix('_')}.{getattr(node.target, '__name__', node.target)}".lstrip(".")


def localize_sizes(graph) -> None:
    """Give every user of a size computation its own copy, placed just before it.

    Each segment then derives the sizes it needs from its own tensor inputs: no SymInt
    crosses a segment boundary (engines take tensors only), and blocks keep the graph
    order of their real ops.
    """
    for node in reversed(list(graph.nodes)):
        if not is_symbolic(node) or not node.users:
            continue
        for user in list(node.users):
            with graph.inserting_before(user):
                copy = graph.node_copy(node)
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
        graph.erase_node(node)


def count_ops(nodes) -> Counter:
    return Counter(op_name(n) for n in nodes if is_compute(n))


def describe_value(node) -> dict[str, Any] | None:
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        return None
    return {"name": node.name, "shape": [int(d) if str(d).isdigit() else str(d) for d in val.shape],
            "dtype": str(val.dtype).removeprefix("torch.")}


def fuse(gm, recipe: list[dict[str, Any]]):
    """Fuse the recipe's node groups into submodules accel_0, accel_1, ... in order."""
    from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

    nodes = {n.name: n for n in gm.graph.nodes}
    partitions = []
    for segment in recipe:
        missing = [name for name in segment["nodes"] if name not in nodes]
        if missing:
            raise ArtifactError(
                f"partition recipe names nodes the program does not have ({', '.join(missing[:3])}).",
                "the partition and lower outputs are out of step: run the pipeline again to rebuild them.",
            )
        partitions.append(dict.fromkeys(nodes[name] for name in segment["nodes"]))
    if partitions:
        gm = fuse_by_partitions(gm, partitions, prefix=ACCEL_PREFIX, always_return_tuple=True)
    inline_constants(gm)
    return gm


def accelerated(gm) -> list[tuple[str, Any]]:
    """(name, call_module node) of every accelerated segment, in execution order."""
    return [(n.target, n) for n in gm.graph.nodes
            if n.op == "call_module" and str(n.target).startswith(ACCEL_PREFIX)]


def inline_constants(gm) -> None:
    """Move weights fed to accelerated submodules inside them, and drop the parent's copy."""
    import torch

    for _, call in accelerated(gm):
        sub = gm.get_submodule(call.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        keep_args = []
        for arg, ph in zip(call.args, placeholders, strict=True):
            if getattr(arg, "op", None) != "get_attr":
                keep_args.append(arg)
                continue
            value = _get_attr(gm, arg.target)
            attr = "c_" + arg.target.replace(".", "_")
            if isinstance(value, torch.nn.Parameter):
                sub.register_parameter(attr, value)
            else:
                sub.register_buffer(attr, value)
            with sub.graph.inserting_before(ph):
                const = sub.graph.get_attr(attr)
            const.meta = dict(ph.meta)
            ph.replace_all_uses_with(const)
            sub.graph.erase_node(ph)
        call.args = tuple(keep_args)
        sub.recompile()
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            _del_attr(gm, node.target)
    gm.recompile()


def _get_attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _del_attr(gm, target: str) -> None:
    """Drop an attribute nothing references any more, so weights are not held twice."""
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner_path, _, attr = target.rpartition(".")
    owner = _get_attr(gm, owner_path) if owner_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)


def capture_inputs(gm, sample) -> dict[str, tuple]:
    """Run the fused program once on `sample` (a shapes.Sample) and record each accelerated segment's inputs."""
    import torch

    captured: dict[str, tuple] = {}
    handles = []
    for name, _ in accelerated(gm):
        def hook(_module, args, name=name):
            captured[name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        handles.append(gm.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            sample(gm)
    finally:
        for h in handles:
            h.remove()
    return captured


def input_profiles(captured: dict[str, dict[str, tuple]], name: str) -> list[dict[str, list]]:
    """Shapes of segment `name`'s inputs at each corner of each profile, from captures at those corners.

    Captures are keyed like export's samples: 'min'/'opt'/'max' for the first profile and
    'p<i>-min'... for extra ones. Running the whole program at the corners gives every
    segment's true min/opt/max, however its shapes derive from the model's inputs.
    """
    def shapes_at(key: str) -> list:
        return [list(a.shape) if hasattr(a, "shape") else None for a in captured[key][name]]

    if "min" not in captured:
        opt = shapes_at("opt")
        return [{"min": opt, "opt": opt, "max": opt}]
    out = [{c: shapes_at(c) for c in ("min", "opt", "max")}]
    extra = sorted({k.split("-")[0] for k in captured if k.startswith("p")})
    for p in extra:
        out.append({c: shapes_at(f"{p}-{c}") for c in ("min", "opt", "max")})
    return out


def dynamic_dims(profiles: list[dict[str, list]] | None) -> tuple | None:
    """torch.export dynamic_shapes for a segment: Dim.DYNAMIC where any profile's min and max differ."""
    import torch

    if not profiles:
        return None
    specs = []
    for i, opt in enumerate(profiles[0]["opt"]):
        if opt is None:
            specs.append(None)
            continue
        varying = {d for p in profiles for d in range(len(opt)) if p["min"][i][d] != p["max"][i][d]}
        specs.append({d: torch.export.Dim.DYNAMIC for d in sorted(varying)} or None)
    return tuple(specs) if any(specs) else None


def truncate_double(module, args: tuple) -> tuple:
    """Torch-TensorRT's truncate_double for one segment: float64 weights, constants and inputs become float32.

    Engines rarely compute in float64 (TensorRT not at all); the hybrid module casts the
    segment's float64 inputs on the way in (TruncatingEngine), as Torch-TensorRT does.
    """
    import torch

    for name, tensor in [*module.named_parameters(recurse=True), *module.named_buffers(recurse=True)]:
        if tensor.dtype == torch.float64:
            owner, _, attr = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            value = tensor.detach().to(torch.float32)
            if isinstance(tensor, torch.nn.Parameter):
                setattr(holder, attr, torch.nn.Parameter(value, requires_grad=False))
            else:
                holder.register_buffer(attr, value)
    for node in module.graph.nodes:
        if node.kwargs.get("dtype") == torch.float64:
            node.kwargs = {**node.kwargs, "dtype": torch.float32}
        node.args = tuple(torch.float32 if a == torch.float64 else a for a in node.args)
    module.recompile()
    return tuple(a.to(torch.float32) if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a
                 for a in args)
