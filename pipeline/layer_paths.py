"""Layers named as the user wrote them: the nn.Module path (`layer3.1.conv2`) of an engine's layer.

Polygraphy and the quantizers report ONNX node or TensorRT layer names (`node_conv2d_5`), and
users cannot map them back to their model (TensorRT issue 4616). torch.onnx's dynamo exporter
records each node's module scopes in its metadata (`pkg.torch.onnx.name_scopes`: the attribute
names from the root module down, then the node's own name); the segment modules keep the model's
nn_module_stack, so the path is the user's. PT2E programs name their layers by module path
already. Reports put the path next to the engine's own name.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

SCOPES = "pkg.torch.onnx.name_scopes"


def scope_path(scopes: list[str]) -> str | None:
    """['', 'layer3', '1', 'conv2', 'conv2d_5'] -> 'layer3.1.conv2' (the root and the node's own name dropped);
    scopes that are already full paths ('layer3', 'layer3.1', ...) give the deepest one."""
    parts = [s for s in scopes[1:-1] if s]
    if not parts:
        return None
    if all(b.startswith(f"{a}.") for a, b in zip(parts, parts[1:], strict=False)):
        return parts[-1]
    return ".".join(parts)


def onnx_paths(path: Path) -> dict[str, str]:
    """node name -> module path of an ONNX file from torch.onnx's dynamo exporter (nodes without scopes left out)."""
    import onnx

    found = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if SCOPES not in props:
            continue
        try:
            scopes = ast.literal_eval(props[SCOPES])
        except (ValueError, SyntaxError):
            continue
        module = scope_path([str(s) for s in scopes]) if isinstance(scopes, list) else None
        if module:
            found[node.name] = module
    return found


def of_segments(converted: list[dict[str, Any]], convert_dir: Path) -> dict[str, str]:
    """`segment/layer` -> module path over every converted ONNX segment (PT2E layers are paths already)."""
    found = {}
    for seg in converted:
        if "onnx" in seg and (convert_dir / seg["onnx"]).is_file():
            found.update({f"{seg['name']}/{node}": module
                          for node, module in onnx_paths(convert_dir / seg["onnx"]).items()})
    return found


def module_of(layer: str, paths: dict[str, str]) -> str | None:
    """The module path of `segment/layer`: from the ONNX map, or the layer itself in a segment the map
    does not cover (PT2E programs name their layers by module path)."""
    if layer in paths:
        return paths[layer]
    segment, _, name = layer.rpartition("/")
    return name if not any(k.startswith(f"{segment}/") for k in paths) else None


def named(layer: str, paths: dict[str, str]) -> str:
    """`accel_0/node_conv2d_5 (layer3.1.conv2)`, or the layer alone where no path is known."""
    module = module_of(layer, paths)
    return f"{layer} ({module})" if module and not layer.endswith(f"/{module}") else layer
