"""Targets: one backend behind one small protocol, found by their modules, imported lazily.

A target module in this package (a name without a leading underscore) holds its class,
its config schema (`Settings`, a dataclass) and `TARGET = TheClass`; that is the one
place a target is registered. The registry, the schema table that Hydra's ConfigStore
gets (`schema_<name>`, used by conf/target/<name>.yaml) and the `target=` choices are
all derived from those modules. Target modules import their heavy libraries inside
methods, so configs compose and the CPU tests run without TensorRT installed.

A target answers which aten ops it runs (the single source of truth for partitioning),
how to lower for it, and how to convert, build and load one accelerated segment. Generic
code (runner, stages, hybrid) never compares a target's name: it asks the target
through the attributes and methods of `Target` below.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from omegaconf import MISSING

from pipeline.errors import ConfigError, TargetUnavailable

# The aspects a stage may ask of a target (StageSpec.asks), for its cache key material.
# PLACING: only where the engines run (export traces on that device, so later stages inherit it).
PLACING, LOWERING, PARTITIONING, CONVERTING, BUILDING, RUNNING = (
    "placing", "lowering", "partitioning", "converting", "building", "running")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TargetSettings:
    """Base of every target's schema (the `target` config group)."""

    name: str = MISSING


@dataclass
class AutoSettings(TargetSettings):
    """target=auto: the first target of `prefer` that can execute on this machine."""

    name: str = "auto"
    # `name` or `name@variant` (a device, or a target's own variant such as onnxruntime@tensorrt for
    # its TensorRT execution provider): GPU engines first, then the CPU targets.
    prefer: list[str] = field(default_factory=lambda: [
        "torch_tensorrt", "tensorrt", "onnxruntime@tensorrt", "inductor@cuda", "onnxruntime@cuda",
        "onnxruntime@cpu", "eager@cpu"])


def cuda_missing() -> str | None:
    """None where torch sees a CUDA GPU, else why engines for one cannot run here."""
    from pipeline import env

    if not env.gpu_absent():
        import torch

        if torch.cuda.is_available():
            return None
    return "no CUDA GPU here (torch.cuda.is_available() is False)"


def resolve_device(asked: str) -> str:
    """target.device: auto is CUDA where torch sees a GPU, else the CPU."""
    if asked not in DEVICES:
        raise ConfigError(f"target.device={asked!r} is not a device.", f"use one of {', '.join(DEVICES)}.")
    if asked == "auto":
        return "cpu" if cuda_missing() else "cuda"
    return asked


class Target:
    """Base protocol with the defaults of a target that accelerates nothing."""

    name = "base"
    Settings: type[TargetSettings] = TargetSettings
    # Libraries whose versions change this target's artifacts (cache keys, tags).
    libraries: tuple[str, ...] = ()
    # What `lower` does and which libraries it uses, for the lower stage's cache key: targets
    # that lower alike (onnxruntime and tensorrt lower as torch.onnx does) share the lowered program.
    lowering: Any = "none"
    lowering_libraries: tuple[str, ...] = ()
    # Settings that apply only when an engine is loaded (session options): in no build key,
    # taken from the job that loads the engine, not from the one that built it.
    runtime_settings: tuple[str, ...] = ()
    # True: the target casts float64 to float32 inside its own converters (Torch-TensorRT's
    # truncate_double), so convert hands it segments unchanged.
    truncates_double: bool = False
    # True: build also saves the whole compiled program in the target's own format (package()).
    saves_program: bool = False
    # True: its engines are code (shared libraries, pickles): pipeline.load loads them only
    # with trusted=True or when the user's own jobs built them (pipeline.provenance; docs/security.md).
    engines_are_code: bool = False
    # Modules the stage worker's server imports once for all the jobs of a sweep: work of seconds
    # that each job's worker would otherwise redo (torch.onnx's op registry for partition).
    sweep_preload: tuple[str, ...] = ()
    # compile.precision -> how this target quantizes to it (a line naming the tool); a precision
    # missing here is refused before any stage (pipeline.checks.check_quantization).
    quantizers: Mapping[str, str] = MappingProxyType({})
    # compile.precision -> why it has no quantizer for it, where the generic reason says too little.
    no_quantizer: Mapping[str, str] = MappingProxyType({})
    # quantize.mode=dynamic (int8 weights, activation scales at run time): how; None: no such route.
    dynamic_quantizer: str | None = None
    # quantize.mode=weight_only (int8 weights, float compute): how this target does it; None: it cannot.
    weight_only_quantizer: str | None = None
    # compile.precision values this target quantizes in the nn.Module before export
    # (Torch-TensorRT's modelopt route): export calibrates and fake-quantizes the model
    # (quantize_module, inside export_context) and build takes the graph's quantize ops as
    # they are, without the accuracy rounds (a round would be a new export).
    quantizes_module: tuple[str, ...] = ()

    def __init__(self, settings: dict[str, Any]):
        # The schema's defaults under the given settings: a target made from some of them has them all.
        defaults = {k: v for k, v in vars(self.Settings()).items() if v != MISSING}
        self.settings = {**defaults, **settings}
        if "device" in self.settings:
            self.settings["device"] = self.resolve_device(self.settings["device"])

    def resolve_device(self, asked: str) -> str:
        return resolve_device(asked)

    # --- availability -----------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None if the target can build here, else what is missing and how to get it."""
        return None

    def can_execute(self) -> str | None:
        """None if this machine can run the built engines, else why not (builds may still work)."""
        return cuda_missing() if self.device() == "cuda" else None

    def device(self) -> str:
        """Where inputs must live for this target's engines: 'cpu' or 'cuda'.

        Targets that run on either take `target.device` (auto|cpu|cuda), resolved when the
        target is made so that keys and reports hold the device actually used.
        """
        return self.settings.get("device", "cpu")

    def trace_device(self) -> str:
        """Where export traces and convert captures: the engines' device where it exists here.

        torch.export bakes devices into the graph (an arange's device=, a mask's .to()), so a
        program traced on the CPU would not run on the GPU; a build-only machine (TensorRT-RTX
        on a CPU) still traces on its CPU.
        """
        return "cuda" if self.device() == "cuda" and cuda_missing() is None else "cpu"

    @classmethod
    def variant(cls, name: str) -> dict[str, Any] | None:
        """Settings for `target=auto`'s `name@variant`; None: no such variant. Devices by default."""
        if name in ("cpu", "cuda") and "device" in cls.Settings.__dataclass_fields__:
            return {"device": name}
        return None

    def configure(self, compile_cfg: dict[str, Any]) -> None:
        """Check and translate this job's compile settings (the resolved `compile` section, plain values)
        before any stage runs (errors here are the user's)."""

    def settle(self, input_cfg) -> dict[str, str]:
        """Choices that follow the job's input (static or dynamic shapes), made in self.settings.

        Returns tags naming each choice and, under `<name>.reason`, why: the runner prints
        them, puts them in the summary and the MLflow tags; config.yaml holds the settings.
        """
        return {}

    # --- what changes its outputs -------------------------------------------------------

    def build_settings(self) -> dict[str, Any]:
        """Settings that change converted or built files: all but the run-time ones."""
        return {k: v for k, v in self.settings.items() if k not in self.runtime_settings}

    def converter_settings(self) -> dict[str, Any]:
        """Settings its convert reads; by default every build setting (conservative)."""
        return self.build_settings()

    def partitioner_settings(self) -> dict[str, Any]:
        """Settings of the target's own partitioner (the pipeline's reads only compile.*)."""
        return {}

    def key_material(self, aspect: str) -> dict[str, Any]:
        """What of this target changes a stage's output, for the stage that asks `aspect`."""
        if aspect == PLACING:
            return {"device": self.trace_device()}
        if aspect == LOWERING:
            return {"lowering": self.lowering}
        if aspect == PARTITIONING:
            return {"name": self.name, **self.partitioner_settings()}
        if aspect == CONVERTING:
            return {"name": self.name, **self.converter_settings()}
        if aspect == BUILDING:
            return {"name": self.name, **self.build_settings()}
        return {"name": self.name, **self.settings}

    def stage_reads(self, aspect: str, config: dict[str, Any]) -> tuple[str, ...]:
        """Config keys the stage asking `aspect` reads for this target, beyond its spec's.

        Export (PLACING) reads the calibration data and the layers kept in fp32 where this
        target quantizes the module, so they key it; for other targets they key build only.
        """

        if aspect == PLACING and self.quantization_route(config["compile"]["precision"]) == "module":
            return ("calibration", "data", "quantize.exclude")
        return ()

    def libraries_for(self, aspect: str) -> tuple[str, ...]:
        if aspect == PLACING:
            return ()
        return self.lowering_libraries if aspect == LOWERING else self.libraries

    def precision_asked(self, precision: str) -> str:
        """The precision engines must compute in for compile.precision (autocast may lower fp32)."""
        return precision

    # --- quantization -------------------------------------------------------------------

    @classmethod
    def quantizer(cls, precision: str, mode: str = "static") -> str | None:
        """How this target quantizes to `precision` in quantize.mode `mode` (a line); None: it cannot."""
        if mode in ("dynamic", "weight_only"):
            return (cls.dynamic_quantizer if mode == "dynamic" else cls.weight_only_quantizer) \
                if precision == "int8" else None
        return cls.quantizers.get(precision)

    def quantizer_refusal(self, config: dict[str, Any], precision: str) -> tuple[str, str] | None:
        """(why not, the fix) where this job's settings are ones its quantizer cannot serve; None: it can.

        Asked of the made target (device resolved, its settings complete), before any stage.
        """
        return None

    def quantization_route(self, precision: str) -> str | None:
        """Where this job quantizes: "module" (export, Target.quantize_module), "segments" (build, with
        the accuracy rounds) or None (compile.precision is not a quantized one)."""
        from pipeline.dtypes import is_quantized

        if not is_quantized(precision):
            return None
        return "module" if precision in self.quantizes_module else "segments"

    def layer_names(self, segment: dict[str, Any], convert_dir: Path) -> tuple[set[str], list[str]] | None:
        """What quantize.exclude can name in a converted segment (all names, compute layers); None: unknown."""
        return None

    # --- stages -------------------------------------------------------------------------

    def quantize_module(self, model, batches: list, precision: str, exclude: list[str]):
        """The model with calibrated fake-quantizers (only for precisions in quantizes_module)."""
        raise NotImplementedError(f"{self.name} does not quantize the module")

    def export_context(self):
        """Where export traces a module quantize_module returned."""
        import contextlib

        return contextlib.nullcontext()

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

    def package(self, gm, example, out: Path) -> str | None:
        """Save the whole compiled program in the target's own format (saves_program); the file name."""
        return None

    # --- running ------------------------------------------------------------------------

    def runtime_options(self, gm) -> dict[str, Any]:
        """Run-time choices that depend on the assembled program (e.g. thread spinning)."""
        return {}

    def engine_threads(self, budget: int, engines: dict[str, Any]) -> int:
        """The CPU threads this target's engines run with when validate gives PyTorch `budget` threads.

        Validate times eager and the engines with one thread count. Engines that run inside
        PyTorch follow torch.set_num_threads; a target with a thread pool of its own sizes it
        here (before its engines load), and one whose count was fixed at build returns that,
        which eager then gets too. `engines`: the build's engines.json.
        """
        return budget

    def load_engine(self, segment: dict[str, Any], build_dir: Path, options: dict[str, Any]):
        """A callable running one segment's engine: tensors in, a tuple of tensors out."""
        raise NotImplementedError

    def load_package(self, path: Path):
        raise NotImplementedError


@functools.cache
def registry() -> dict[str, type[Target]]:
    """Every target of this package: modules without a leading underscore that define TARGET."""
    found: dict[str, type[Target]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TARGET", None)
        if cls is not None:
            found[cls.name] = cls
    return found


def schemas() -> dict[str, type[TargetSettings]]:
    """Config schema per `target=` choice, auto included."""
    return {"auto": AutoSettings, **{name: cls.Settings for name, cls in registry().items()}}


def target_class(name: str) -> type[Target]:
    if name not in registry():
        known = sorted(schemas())
        raise ConfigError(f"unknown target {name!r}.", f"use target= one of {', '.join(known)}.")
    return registry()[name]


def quantizing(precision: str, mode: str = "static") -> list[str]:
    """The targets that quantize to `precision` in `mode`, by name."""
    return sorted(name for name, cls in registry().items() if cls.quantizer(precision, mode))


def make(name: str, settings: dict[str, Any]) -> Target:
    cls = target_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise TargetUnavailable(f"target {name} cannot run here: {reason}.",
                                "install what is missing, or use target=auto to pick one that can.")
    return cls(settings)


def default_settings(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(target_class(name).Settings), enum_to_str=True)


def resolve(target_cfg: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """(target name, its settings, why it was chosen). `auto` picks the first that can run."""
    name = target_cfg["name"]
    if name != "auto":
        target_class(name)
        return name, target_cfg, f"target={name} was asked for"
    passed_over = []
    for candidate in target_cfg["prefer"]:
        settings, reason = candidate_settings(candidate)
        if reason is None:
            why = "; ".join(passed_over) or "it is the first preference"
            return candidate.partition("@")[0], settings, f"target=auto chose {candidate} ({why})"
        passed_over.append(f"not {candidate}: {reason}")
    raise TargetUnavailable("target=auto found no target that can run here: " + "; ".join(passed_over) + ".",
                            "install onnxruntime (pip install onnxruntime), or set target=eager.")


def candidate_settings(candidate: str) -> tuple[dict[str, Any] | None, str | None]:
    """(settings, None) if `name[@variant]` can build and execute here, else (None, why not)."""
    name, _, variant = candidate.partition("@")
    if name not in registry():
        return None, f"no target named {name}"
    cls = target_class(name)
    extra = cls.variant(variant) if variant else {}
    if extra is None:
        return None, f"{name} has no variant {variant!r}"
    if extra.get("device") == "cuda" and cuda_missing():  # before the target's own checks, which can cost seconds
        return None, cuda_missing()
    reason = cls.unavailable_reason()
    if reason:
        return None, reason
    # auto must pick a target whose engines can also execute here, not only build.
    settings = {**default_settings(name), **extra}
    try:
        reason = cls(settings).can_execute()
    except ConfigError as err:
        reason = err.problem
    return (None, reason) if reason else (settings, None)
