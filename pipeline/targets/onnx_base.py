"""The base of the ONNX-based targets (onnxruntime, tensorrt): torch.onnx's op registry, its lowering, segment export.

Op support comes from the registry the exporter itself dispatches through (onnxscript's
torchlib), and lowering uses the same ONNX-friendly decomposition table torch.onnx
builds, so the partition report says exactly what the exporter will convert. These are
torch.onnx internals: every call into them is in this module.
"""

from __future__ import annotations

import functools
import operator
from pathlib import Path
from typing import Any

from pipeline.errors import CompileError, first_line
from pipeline.targets import Target

# Protobuf cannot hold a model over 2 GiB; keep weights beside it from well below that.
# The lowest target.opset: torch.onnx writes opset 18 and converts down with ONNX's version
# converter, which fails on lower opsets (opset=5: a traceback at convert, then exit 0).
MIN_OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30


@functools.cache
def registry():
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib()


@functools.cache
def decomposition_table():
    from torch.onnx._internal.exporter import _decomp

    ops = set(_decomp.get_onnx_implemented_overloads(registry()))
    return _decomp.create_onnx_friendly_decomposition_table(ops)


def value_info(value) -> dict[str, Any]:
    return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}


class OnnxTarget(Target):
    """Lower, support and convert through torch.onnx; subclasses build and load engines."""

    lowering = "torch.onnx decompositions, export checks dropped, sizes localised"
    # torch.onnx's decomposition table and op registry come from onnxscript's torchlib.
    lowering_libraries = ("onnxscript",)
    # The registry costs seconds of CPU (onnx and onnxscript imported, torchlib's functions parsed):
    # in a sweep whose lower is a cache hit, each job's partition paid it (56 s a job on a loaded machine).
    sweep_preload = ("pipeline.targets._onnx_registry",)

    def lower(self, program):
        from pipeline.segments import assertions, localize_sizes

        program = program.run_decompositions(decomposition_table())
        # torch.onnx drops export's runtime checks before converting; drop them here too, with
        # the size arithmetic that fed them, so they neither split segments nor pull a
        # data-dependent tensor into an accelerated segment just to read its length.
        graph = program.graph_module.graph
        checks = assertions()
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in checks:
                graph.erase_node(node)
        graph.eliminate_dead_code()
        localize_sizes(graph)
        program.graph_module.recompile()
        return program

    def converter_settings(self) -> dict[str, Any]:
        """Segments are exported by torch.onnx: only the opset changes the files."""
        return {"opset": self.settings.get("opset")}

    def is_supported(self, node) -> bool:
        if node.op != "call_function":
            return False
        if node.target is operator.getitem:
            return True
        # OpOverloads, and the size arithmetic torch.onnx also converts (operator.mul,
        # operator.floordiv, torch.sym_float, ... on SymInts).
        return registry().is_registered(node.target)

    def unsupported_reason(self, node) -> str:
        return "no ONNX conversion for this op in torch.onnx"

    def convert(self, name: str, module, args: tuple, out: Path, compile_cfg,
                profiles: list[dict[str, list]] | None = None) -> dict[str, Any]:
        import torch

        from pipeline.segments import dynamic_dims

        module.eval()
        weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        path = out / f"{name}.onnx"
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    module, args, dynamo=True, verbose=False, optimize=True, dynamic_shapes=dynamic_dims(profiles),
                    opset_version=self.settings.get("opset"),
                    external_data=weight_bytes > EXTERNAL_DATA_BYTES,
                )
            program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
        except Exception as err:  # the exporter raises many types; the message is what matters
            raise CompileError(
                f"ONNX export of segment {name} failed: {first_line(err)}",
                "keep the failing ops in PyTorch with compile.torch_executed_ops, or try target=eager.",
            ) from err
        outputs = module(*args)
        return {
            "name": name,
            "onnx": path.name,
            "inputs": [value_info(a) for a in args],
            "outputs": [value_info(o) for o in outputs],
            "profiles": profiles or [],
        }

    def layer_names(self, segment: dict[str, Any], convert_dir: Path) -> tuple[set[str], list[str]]:
        """What quantize.exclude can name in this segment (its ONNX nodes), and its compute layers (hints)."""
        import onnx

        from pipeline.quantize.ort_qdq import FLOAT_COMPUTE

        nodes = onnx.load(str(convert_dir / segment["onnx"]), load_external_data=False).graph.node
        return {n.name for n in nodes}, [n.name for n in nodes if n.op_type in FLOAT_COMPUTE]


def check_external_data(model_path: Path, folder: Path) -> None:
    """Refuse, before a runtime opens it, a model whose external data leaves `folder` or is no regular file.

    ONNX Runtime opens each initializer's `location` (relative to the model) before its own
    checks refuse an absolute path or `..`; a symbolic link inside the folder it follows. So
    the model is parsed without its external data and every location is confined first.
    """
    import onnx

    from pipeline.errors import ArtifactError
    from pipeline.files import confined

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 (protobuf's DecodeError and friends: not a model)
        raise ArtifactError(f"{model_path} is not an ONNX model ({type(err).__name__}).",
                            "rebuild the run with this pipeline.") from None
    base = model_path.parent.relative_to(folder)  # locations are relative to the model's own folder
    for tensor in tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location")
        why = confined(folder, (base / location).as_posix() if location else location)
        if why:
            raise ArtifactError(f"{model_path}: initializer {tensor.name!r} reads its data from {location!r}, "
                                f"which is refused ({why}).",
                                "a run folder names only its own files: rebuild it, and do not load folders "
                                "from unknown sources.")


def tensors(model) -> list:
    """Every tensor of a model: initializers, sparse ones, and tensor attributes, in subgraphs and functions."""
    found, graphs = [], [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            found.extend(graph.initializer)
            found.extend(t for s in graph.sparse_initializer for t in (s.values, s.indices))
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            found.extend([attribute.t, *attribute.tensors] if attribute.HasField("t") else attribute.tensors)
            graphs.extend([attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs)
    return found
