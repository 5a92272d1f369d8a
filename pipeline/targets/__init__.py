"""Targets: one backend behind one small protocol, registered by name, imported lazily.

A target answers which aten ops it runs (the single source of truth for partitioning),
how to lower for it, and how to convert, build and load one accelerated segment. Target
modules import their heavy libraries inside methods, so configs compose and the CPU
tests run without TensorRT installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, TargetUnavailable

REGISTRY: dict[str, str] = {
    "onnxruntime": "pipeline.targets.onnxruntime:OnnxRuntimeTarget",
    "tensorrt": "pipeline.targets.tensorrt:TensorRTTarget",
    "torch_tensorrt": "pipeline.targets.torch_tensorrt:TorchTensorRTTarget",
    "inductor": "pipeline.targets.inductor:InductorTarget",
    "eager": "pipeline.targets.eager:EagerTarget",
}

class Target:
    """Base protocol with the defaults of a target that accelerates nothing."""

    name = "base"
    # Libraries whose versions change this target's artifacts (go into cache keys and tags).
    libraries: tuple[str, ...] = ()
    # What `lower` does, for the lower stage's cache key: targets that lower alike share the
    # lowered program (onnxruntime and tensorrt both lower as torch.onnx does).
    lowering: Any = "none"

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None if the target can execute here, else what is missing and how to get it."""
        return None

    def can_execute(self) -> str | None:
        """None if this machine can run the built engines, else why not (builds may still work)."""
        return None

    def device(self) -> str:
        """Where inputs must live for this target's engines: 'cpu' or 'cuda'."""
        return "cpu"

    def configure(self, compile_cfg) -> None:
        """Check and translate this job's compile settings before any stage runs (errors here are the user's)."""

    def lower(self, program):
        return program

    def graph_module(self, program):
        """The lowered program as the graph that partition, convert and the hybrid module share."""
        return program.module()

    def partition(self, gm) -> list[list[str]] | None:
        """Node names of each accelerated block from the target's own partitioner; None: the pipeline's."""
        return None

    def is_supported(self, node) -> bool:
        return False

    def unsupported_reason(self, node) -> str:
        return f"no {self.name} implementation"

    def convert(self, name: str, module, args: tuple, out: Path, compile_cfg,
                profiles: list[dict[str, list]] | None = None) -> dict[str, Any]:
        """Convert one segment traced with `args` (opt sizes); `profiles`: its input shapes at min/opt/max."""
        raise NotImplementedError

    def build(self, segment: dict[str, Any], convert_dir: Path, out: Path, compile_cfg) -> dict[str, Any]:
        raise NotImplementedError

    def load_engine(self, segment: dict[str, Any], build_dir: Path):
        raise NotImplementedError

    def package(self, gm, example, out: Path) -> str | None:
        """Save the whole compiled program in the target's own format; the file name, or None."""
        return None

    def load_package(self, path: Path):
        raise NotImplementedError


def target_class(name: str) -> type[Target]:
    if name not in REGISTRY:
        known = sorted(set(REGISTRY) | {"auto"})
        raise ConfigError(f"unknown target {name!r}.", f"use target= one of {', '.join(known)}.")
    module_name, _, cls_name = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def make(name: str, settings: dict[str, Any]) -> Target:
    cls = target_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise TargetUnavailable(f"target {name} cannot run here: {reason}.",
                                "install what is missing, or use target=auto to pick one that can.")
    return cls(settings)


def resolve(target_cfg: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """(target name, its settings, why it was chosen). `auto` picks the first that can run."""
    from omegaconf import OmegaConf

    from pipeline.config import TARGET_SCHEMAS

    name = target_cfg["name"]
    if name != "auto":
        target_class(name)
        return name, target_cfg, f"target={name} was asked for"
    passed_over = []
    for candidate in target_cfg["prefer"]:
        settings = None
        if candidate in REGISTRY:
            cls = target_class(candidate)
            reason = cls.unavailable_reason()
            if reason is None:
                # auto must pick a target whose engines can also execute here, not only build.
                settings = OmegaConf.to_container(OmegaConf.structured(TARGET_SCHEMAS[candidate]))
                reason = cls(settings).can_execute()
        else:
            reason = f"no target named {candidate}"
        if reason is None:
            why = "; ".join(passed_over) or "it is the first preference"
            return candidate, settings, f"target=auto chose {candidate} ({why})"
        passed_over.append(f"not {candidate}: {reason}")
    raise TargetUnavailable("target=auto found no target that can run here: " + "; ".join(passed_over) + ".",
                            "install onnxruntime (pip install onnxruntime), or set target=eager.")
