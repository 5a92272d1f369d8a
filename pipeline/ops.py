"""Operator names as users write them (aten.relu.default, aten.relu, torch.ops.aten.add.Tensor).

The one parser of such names: compile.torch_executed_ops is checked with it before any
stage runs, partition compares node ops with the names it returns, and the
Torch-TensorRT target turns them into the OpOverloads its settings take.
"""

from __future__ import annotations

from pipeline.errors import ConfigError

HINT = ("use post-decomposition names such as aten.relu.default or aten.add.Tensor "
        "(partition/report.json of a run lists the ops of your model).")


def parse(raw: str, setting: str = "compile.torch_executed_ops") -> tuple[str, str, list[str]]:
    """(namespace, packet, overloads) of a name; a bare packet means every overload. Unknown: ConfigError."""
    import torch

    parts = raw.removeprefix("torch.ops.").split(".")
    namespace = getattr(torch.ops, parts[0], None) if len(parts) in (2, 3) else None
    packet = getattr(namespace, parts[1], None) if namespace is not None else None
    if packet is None or not isinstance(packet, torch._ops.OpOverloadPacket):
        raise ConfigError(f"{setting} names {raw!r}, which is not an operator.", HINT)
    overloads = packet.overloads()
    if len(parts) == 3:
        if parts[2] not in overloads:
            raise ConfigError(
                f"{setting} names {raw!r}, but {parts[0]}.{parts[1]} has no overload {parts[2]!r}.",
                f"use one of: {', '.join(f'{parts[0]}.{parts[1]}.{o}' for o in overloads)}.",
            )
        overloads = [parts[2]]
    return parts[0], parts[1], list(overloads)


def resolve(names, setting: str = "compile.torch_executed_ops") -> set[str]:
    """Every overload the names cover, as 'namespace.packet.overload' strings (checked)."""
    resolved = set()
    for raw in names:
        namespace, packet, overloads = parse(raw, setting)
        resolved.update(f"{namespace}.{packet}.{o}" for o in overloads)
    return resolved


def overloads(names, setting: str = "compile.torch_executed_ops") -> set:
    """The torch OpOverload objects the names cover."""
    import torch

    out = set()
    for raw in names:
        namespace, packet, found = parse(raw, setting)
        op = getattr(getattr(torch.ops, namespace), packet)
        out.update(getattr(op, o) for o in found)
    return out
