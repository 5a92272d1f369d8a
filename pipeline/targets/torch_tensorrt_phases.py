"""Every call into Torch-TensorRT's phase functions, which are importable but not public.

`torch_tensorrt.dynamo.compile` runs lowering, partitioning and conversion in one call;
the pipeline runs them as separate stages so each is cached and reported on its own.
The functions below change between releases (pyproject pins one minor), so nothing else
in the project imports from inside torch_tensorrt: a new release means reading this
module against that release's `dynamo/_compiler.py`, not hunting through the stages.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from pipeline import ops


@functools.cache
def _dynamo():
    import torch_tensorrt.dynamo

    return torch_tensorrt.dynamo


def compilation_settings(values: dict[str, Any]):
    """Our translated settings (plain values) as Torch-TensorRT's CompilationSettings."""
    import torch

    values = dict(values)
    values.pop("engine_cache_dir", None)
    values.pop("engine_cache_size", None)
    values["torch_executed_ops"] = ops.overloads(values.get("torch_executed_ops", []))
    if "enabled_precisions" in values:
        values["enabled_precisions"] = {getattr(torch, d) for d in values["enabled_precisions"]}
    if values.get("autocast_low_precision_type"):
        values["autocast_low_precision_type"] = getattr(torch, values["autocast_low_precision_type"])
    if "autocast_excluded_ops" in values:
        values["autocast_excluded_ops"] = ops.overloads(values["autocast_excluded_ops"], "target.autocast_excluded_ops")
    return _dynamo().CompilationSettings(**values)


def engine_cache(values: dict[str, Any]):
    """Torch-TensorRT's own engine cache, when the config names a directory for it."""
    if not values.get("engine_cache_dir"):
        return None
    from torch_tensorrt.dynamo._engine_cache import DiskEngineCache

    return DiskEngineCache(values["engine_cache_dir"], values["engine_cache_size"])


def lower(program, settings):
    """Pre-export lowering passes, then run_decompositions with Torch-TensorRT's table."""
    from torch_tensorrt.dynamo.lowering import get_decompositions, pre_export_lowering

    program = pre_export_lowering(program, settings)
    return program.run_decompositions(get_decompositions(settings.enable_experimental_decompositions))


def post_lower(gm, settings):
    """The post-lowering passes compile() runs on program.module(); deterministic, so re-runnable."""
    from torch_tensorrt.dynamo.lowering import post_lowering

    return post_lowering(gm, settings)


def converters(settings):
    """The converter registry, told the settings its capability validators read."""
    from torch_tensorrt.dynamo.conversion._ConverterRegistry import DYNAMO_CONVERTERS

    DYNAMO_CONVERTERS.set_compilation_settings(settings)
    return DYNAMO_CONVERTERS


def partition(gm, settings) -> tuple[list[list[str]], dict[str, int]]:
    """Torch-TensorRT's partitioner: node names of each TensorRT block, and unsupported op counts."""
    converters(settings)
    gm = copy.deepcopy(gm)  # the partitioner rewrites the graph it is given
    partitioning = _dynamo().partitioning
    split = partitioning.fast_partition if settings.use_fast_partitioner else partitioning.global_partition
    fused, support = split(gm, min_block_size=settings.min_block_size,
                           torch_executed_ops=settings.torch_executed_ops,
                           require_full_compilation=settings.require_full_compilation)
    blocks = []
    for node in fused.graph.nodes:
        if node.op == "call_module" and "_run_on_acc" in str(node.target):
            sub = fused.get_submodule(node.target)
            blocks.append([n.name for n in sub.graph.nodes if n.op not in ("placeholder", "output")])
    return blocks, dict(support.unsupported_operators)


def convert(submodule, settings, values: dict[str, Any]) -> dict[str, Any]:
    """Interpret one segment into a TensorRT network and build its engine (one phase in Torch-TensorRT)."""
    from torch_tensorrt.dynamo.conversion import interpret_module_to_result

    inputs = _dynamo().partitioning.construct_submodule_inputs(submodule)
    result = interpret_module_to_result(submodule, inputs, settings, engine_cache=engine_cache(values))
    return {
        "engine": bytes(result.serialized_engine),
        "input_names": list(result.input_names),
        "output_names": list(result.output_names),
        "requires_output_allocator": bool(result.requires_output_allocator),
        "symbolic_shape_expressions": result.symbolic_shape_expressions,
        "requires_native_multidevice": bool(getattr(result, "requires_native_multidevice", False)),
        "aliased_io": dict(getattr(result, "aliased_io", {}) or {}),
    }


def engine_module(engine: bytes, meta: dict[str, Any], settings, name: str):
    """The runtime module Torch-TensorRT itself would put in place of the segment."""
    from torch_tensorrt.dynamo.runtime import TorchTensorRTModule

    return TorchTensorRTModule(
        serialized_engine=engine, input_binding_names=meta["input_names"],
        output_binding_names=meta["output_names"], name=name, settings=settings,
        requires_output_allocator=meta["requires_output_allocator"],
        requires_native_multidevice=meta.get("requires_native_multidevice", False),
        symbolic_shape_expressions=meta.get("symbolic_shape_expressions"),
        aliased_io=meta.get("aliased_io") or None,
    )


def save(gm, path: Path, args: tuple, kwargs: dict[str, Any]) -> None:
    """retrace=True keeps the symbolic (min/max) shapes the engines were built with."""
    import torch_tensorrt

    torch_tensorrt.save(gm, str(path), output_format="exported_program", arg_inputs=list(args),
                        kwarg_inputs=kwargs or None, retrace=True)


def load(path: Path):
    import torch_tensorrt

    return torch_tensorrt.load(str(path)).module()
