"""Torch-TensorRT's dynamo frontend, run phase by phase so every stage reports what it will do.

The stages map onto the phases of `torch_tensorrt.dynamo.compile`: lower = its
pre-export lowering and decomposition table (post-lowering passes run whenever the
lowered program is loaded, as compile() runs them on `program.module()`); partition =
its partitioner over its converter registry; convert = its interpreter, which builds
the engine (TensorRT networks are built as they are defined, so this target's engine
build time sits in convert); build = the engines as files plus the whole program
saved with `torch_tensorrt.save`, which `pipeline.load` reloads.

Our settings are translated into Torch-TensorRT's per installed version by a pure
function, `translate`, so the rules are tested on machines without it: a setting the
installed version silently ignores (`enabled_precisions` from 2.13) is rejected with
what to use instead. Calls into Torch-TensorRT itself live in torch_tensorrt_phases.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline import symbolic
from pipeline.dtypes import ENGINE_DTYPES, PRECISION_DTYPES, compute_dtype
from pipeline.errors import ArtifactError, ConfigError, first_line
from pipeline.files import link_or_copy, write_json
from pipeline.schema import bounded, choice
from pipeline.targets import PLACING, Target, TargetSettings
from pipeline.targets.onnx_base import value_info

INSTALL = "pip install -e '.[torch-tensorrt]' (Linux x86-64, a CUDA GPU, NVIDIA's TensorRT wheels)"
# The oldest release whose settings `translate` knows (the first with enable_autocast).
OLDEST = (2, 11)
# From 2.13 networks are strongly typed: these settings are gone (and were silently ignored).
STRONGLY_TYPED = (2, 13)
# Autocast's low precision types, by their dtype names.
LOW_PRECISION = ("float16", "bfloat16")
# Translated settings that only the engine builder reads: not the partitioner's (converter
# capability validators read the rest through the registry's settings).
BUILDER_ONLY = ("optimization_level", "workspace_size", "immutable_weights", "hardware_compatible",
                "version_compatible", "pass_through_build_failures", "timing_cache_path", "cache_built_engines",
                "reuse_cached_engines", "engine_cache_dir", "engine_cache_size")
# Settings only its partitioner reads: out of the convert and build keys (equal splits share engines).
PARTITION_ONLY = ("min_block_size", "torch_executed_ops", "require_full_compilation", "use_fast_partitioner")


@dataclass
class Settings(TargetSettings):
    """Torch-TensorRT's dynamo frontend; partitioning and builder settings also come from `compile`.

    Names follow torch_tensorrt.dynamo.compile so settings carry across. Settings the
    installed version does not honour are rejected, never dropped.
    """

    name: str = "torch_tensorrt"
    # Honour the graph's dtypes; from 2.13 always on (networks are strongly typed).
    use_explicit_typing: bool | None = None
    # Before 2.13 only: the kernel precisions TensorRT may choose from, e.g. [float16, float32].
    enabled_precisions: list[str] = field(default_factory=list)
    # Let Torch-TensorRT run chosen layers of an fp32 model in a lower precision.
    enable_autocast: bool = False
    # float16 | bfloat16 (with enable_autocast)
    autocast_low_precision_type: str | None = choice(None, LOW_PRECISION)
    # Regexes of node names and op names (aten.softmax.int) kept in fp32 by autocast.
    autocast_excluded_nodes: list[str] = field(default_factory=list)
    autocast_excluded_ops: list[str] = field(default_factory=list)
    autocast_max_output_threshold: float = bounded(512.0, low=0)
    # false builds refittable engines (weights can be swapped without a rebuild).
    immutable_weights: bool = True
    # Torch-TensorRT's own engine cache (in addition to the pipeline's stage cache).
    engine_cache_dir: str | None = None
    engine_cache_size: int = bounded(1 << 30, low=0)
    # Timing cache file (not used by TensorRT-RTX, which does not autotune).
    timing_cache_path: str | None = None
    use_fast_partitioner: bool = True
    enable_experimental_decompositions: bool = False
    hardware_compatible: bool = False
    version_compatible: bool = False


def parse_version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return int(match[1]), int(match[2])


def installed_version() -> tuple[str, tuple[int, int], bool] | None:
    """(version, (major, minor), is the TensorRT-RTX build) of the installed torch_tensorrt."""
    for dist, rtx in (("torch-tensorrt", False), ("torch-tensorrt-rtx", True)):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version, parse_version(version), rtx
    return None


def translate(compile_cfg: dict[str, Any], target_cfg: dict[str, Any], version: tuple[int, int],
              rtx: bool = False) -> dict[str, Any]:
    """Our compile/target config as CompilationSettings fields of torch_tensorrt `version`.

    Values stay plain (op names, dtype names) so the result is JSON for the stage
    manifests; torch_tensorrt_phases turns them into Torch-TensorRT objects.
    """
    label = f"torch-tensorrt {version[0]}.{version[1]}"
    if version < OLDEST:
        raise ConfigError(f"{label} is older than this pipeline supports ({OLDEST[0]}.{OLDEST[1]}).",
                          f"upgrade: {INSTALL}.")
    precision = compile_cfg["precision"]
    return {**_common(compile_cfg, target_cfg),
            **_typing(target_cfg, precision, version, label),
            **_autocast(target_cfg, precision),
            **_caches(target_cfg, rtx)}


def _common(compile_cfg: dict[str, Any], target_cfg: dict[str, Any]) -> dict[str, Any]:
    """Settings every supported version takes under the same name."""
    out = {
        "min_block_size": int(compile_cfg["min_block_size"]),
        "torch_executed_ops": sorted(compile_cfg.get("torch_executed_ops") or []),
        "require_full_compilation": bool(compile_cfg["require_full_compilation"]),
        "optimization_level": int(compile_cfg["optimization_level"]),
        "truncate_double": bool(compile_cfg["truncate_long_and_double"]),
        "immutable_weights": bool(target_cfg["immutable_weights"]),
        "use_fast_partitioner": bool(target_cfg["use_fast_partitioner"]),
        "enable_experimental_decompositions": bool(target_cfg["enable_experimental_decompositions"]),
        "hardware_compatible": bool(target_cfg["hardware_compatible"]),
        "version_compatible": bool(target_cfg["version_compatible"]),
        # Failing builds must fail the job, not fall back to PyTorch behind the report's back.
        "pass_through_build_failures": True,
    }
    if int(compile_cfg["workspace_size"]) > 0:
        out["workspace_size"] = int(compile_cfg["workspace_size"])
    return out


def _typing(target_cfg: dict[str, Any], precision: str, version: tuple[int, int], label: str) -> dict[str, Any]:
    """Explicit typing and enabled_precisions: settable before 2.13, rejected after (strongly typed)."""
    explicit, precisions = target_cfg.get("use_explicit_typing"), list(target_cfg.get("enabled_precisions") or [])
    if version >= STRONGLY_TYPED:
        if precisions:
            raise ConfigError(f"target.enabled_precisions={precisions} is ignored by {label}: networks are strongly "
                              "typed and take their precision from the graph.",
                              "remove it and set compile.precision=fp16 (casts the model), or keep fp32 and set "
                              "target.enable_autocast=true target.autocast_low_precision_type=float16.")
        if explicit is False:
            raise ConfigError(f"target.use_explicit_typing=false is not possible with {label}: every network is "
                              "strongly typed.", "remove target.use_explicit_typing.")
        return {}
    out: dict[str, Any] = {"use_explicit_typing": True if explicit is None else bool(explicit)}
    unknown = [p for p in precisions if p not in ENGINE_DTYPES]
    if unknown:
        raise ConfigError(f"target.enabled_precisions has unknown dtypes {unknown}.",
                          f"use names from {sorted(ENGINE_DTYPES)}.")
    # int8/fp8 (modelopt's quantize ops) must be among the kernels before strongly typed releases.
    out["enabled_precisions"] = sorted(set(precisions) or {"float32", compute_dtype(precision)})
    return out


def _autocast(target_cfg: dict[str, Any], precision: str) -> dict[str, Any]:
    low = target_cfg.get("autocast_low_precision_type")
    low = PRECISION_DTYPES.get(low, low)
    if not target_cfg["enable_autocast"]:
        if low or target_cfg["autocast_excluded_nodes"] or target_cfg["autocast_excluded_ops"]:
            raise ConfigError("target.autocast_* settings are set but target.enable_autocast is false.",
                              "set target.enable_autocast=true, or remove the autocast settings.")
        return {}
    if precision != "fp32":
        raise ConfigError(f"target.enable_autocast lowers an fp32 model, but compile.precision={precision} "
                          "already casts it.", "set compile.precision=fp32, or target.enable_autocast=false.")
    if low not in LOW_PRECISION:
        raise ConfigError(f"target.enable_autocast=true needs target.autocast_low_precision_type, got {low!r}.",
                          "set target.autocast_low_precision_type=float16 (or bfloat16).")
    return {
        "enable_autocast": True,
        "autocast_low_precision_type": low,
        "autocast_excluded_nodes": list(target_cfg["autocast_excluded_nodes"]),
        "autocast_excluded_ops": sorted(target_cfg["autocast_excluded_ops"]),
        "autocast_max_output_threshold": float(target_cfg["autocast_max_output_threshold"]),
    }


def _caches(target_cfg: dict[str, Any], rtx: bool) -> dict[str, Any]:
    """Torch-TensorRT's timing cache and engine cache (they speed builds up, change no engine)."""
    out: dict[str, Any] = {}
    if target_cfg.get("timing_cache_path"):
        if rtx:
            raise ConfigError("target.timing_cache_path is not used by Torch-TensorRT for TensorRT-RTX "
                              "(it does not autotune).", "remove target.timing_cache_path.")
        out["timing_cache_path"] = str(target_cfg["timing_cache_path"])
    if target_cfg.get("engine_cache_dir"):
        out.update({"cache_built_engines": True, "reuse_cached_engines": True,
                    "engine_cache_dir": str(target_cfg["engine_cache_dir"]),
                    "engine_cache_size": int(target_cfg["engine_cache_size"])})
    return out


class TorchTensorRTTarget(Target):
    name = "torch_tensorrt"
    Settings = Settings
    libraries = ("torch_tensorrt", "tensorrt", "tensorrt_rtx")
    lowering_libraries = ("torch_tensorrt",)
    # Torch-TensorRT truncates float64 inside its own converters (truncate_double).
    truncates_double = True
    # build saves the whole program with torch_tensorrt.save; pipeline.load reloads it.
    saves_program = True
    # Its engine modules and packages are pickles (shape expressions, torch_tensorrt.load).
    engines_are_code = True
    # compile.precision=int8/fp8: Torch-TensorRT's documented route, modelopt's PTQ on the module
    # before export (pipeline.quantize.torch_modelopt); its quantize ops become Q/DQ layers.
    quantizes_module = ("int8", "fp8")
    quantizers = MappingProxyType({
        "int8": "nvidia-modelopt's mtq.quantize (INT8_DEFAULT_CFG, max calibration) on the module before export; "
                "Torch-TensorRT builds its quantize ops as explicit INT8",
        "fp8": "nvidia-modelopt's mtq.quantize (FP8_DEFAULT_CFG) on the module before export; "
               "Torch-TensorRT builds its quantize ops as FP8 (E4M3)"})

    def quantizer_refusal(self, config: dict[str, Any], precision: str) -> tuple[str, str] | None:
        from pipeline.quantize import torch_modelopt

        return torch_modelopt.refusal(config, precision)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        found = installed_version()
        if found is None or importlib.util.find_spec("torch_tensorrt") is None:
            return f"torch_tensorrt is not installed ({INSTALL})"
        import torch

        version, minor, _ = found
        torch_minor = parse_version(torch.__version__)
        if minor != torch_minor:
            return (f"torch-tensorrt {version} is built for torch {minor[0]}.{minor[1]}, not {torch.__version__} "
                    f"(pip install 'torch-tensorrt=={torch_minor[0]}.{torch_minor[1]}.*')")
        if not torch.cuda.is_available():
            return "no CUDA GPU (torch.cuda.is_available() is false); Torch-TensorRT builds and runs on the GPU"
        try:
            importlib.import_module("torch_tensorrt")
        except Exception as err:  # a broken install raises anything from OSError to RuntimeError
            return f"torch_tensorrt {version} does not import: {first_line(err)}"
        return None

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        # Torch-TensorRT's names for this job's settings; engines.json keeps them for reloading.
        self.values: dict[str, Any] | None = settings.get("translated")
        # int8/fp8 when this job quantizes the module (set by configure, which the runner calls).
        self.module_precision: str | None = None

    def device(self) -> str:
        return "cuda"

    def configure(self, compile_cfg: dict[str, Any], release: tuple[tuple[int, int], bool] | None = None) -> None:
        """Translate for the installed release, or for `release` ((major, minor), is RTX) where none is."""
        minor, rtx = release or installed_version()[1:]
        self.values = translate(compile_cfg, self.settings, minor, rtx)
        self.settings = {**self.settings, "translated": self.values}
        precision = compile_cfg["precision"]
        self.module_precision = precision if self.quantization_route(precision) == "module" else None

    def libraries_for(self, aspect: str) -> tuple[str, ...]:
        """modelopt quantizes the module in export (int8/fp8 jobs) and registers the op its converter reads."""
        modelopt = ("nvidia-modelopt",) if self.module_precision else ()
        return modelopt if aspect == PLACING else (*super().libraries_for(aspect), *modelopt)

    def quantize_module(self, model, batches: list, precision: str, exclude: list[str]):
        from pipeline.quantize import torch_modelopt

        model = torch_modelopt.quantize_module(model, batches, precision, exclude)
        return model, torch_modelopt.record(model, precision)

    def export_context(self):
        from pipeline.quantize import torch_modelopt

        return torch_modelopt.export_context()

    def build_settings(self) -> dict[str, Any]:
        """Every setting that changes an engine; not the partitioner's (the recipe keys convert and build)."""
        settings = {k: v for k, v in super().build_settings().items() if k not in PARTITION_ONLY}
        if "translated" in settings:
            settings["translated"] = {k: v for k, v in self.values.items() if k not in PARTITION_ONLY}
        return settings

    def partitioner_settings(self) -> dict[str, Any]:
        """Its partitioner and the converters' capability validators read CompilationSettings."""
        return {k: v for k, v in (self.values or {}).items() if k not in BUILDER_ONLY}

    def precision_asked(self, precision: str) -> str:
        """fp32 with autocast asks the engines to compute in the autocast type."""
        low = (self.values or {}).get("autocast_low_precision_type")
        if (self.values or {}).get("enable_autocast") and low:
            return {v: k for k, v in PRECISION_DTYPES.items()}[low]
        return precision

    @property
    def lowering(self) -> dict[str, Any]:
        """Torch-TensorRT's lowering reads these settings (decompositions, autocast)."""
        keys = ("enable_experimental_decompositions", "enable_autocast", "autocast_low_precision_type",
                "autocast_excluded_nodes", "autocast_excluded_ops", "autocast_max_output_threshold")
        return {"torch_tensorrt": {k: v for k, v in (self.values or {}).items() if k in keys}}

    @functools.cached_property
    def _phases(self):
        from pipeline.targets import torch_tensorrt_phases

        return torch_tensorrt_phases

    @functools.cached_property
    def compilation_settings(self):
        if self.values is None:
            raise ConfigError("the torch_tensorrt target was used before its settings were translated.",
                                  "this is a bug in the pipeline: report it.")
        return self._phases.compilation_settings(self.values)

    def lower(self, program):
        return self._phases.lower(program, self.compilation_settings)

    def graph_module(self, program):
        return self._phases.post_lower(program.module(), self.compilation_settings)

    def is_supported(self, node) -> bool:
        return node.op == "call_function" and node in self._phases.converters(self.compilation_settings)

    def unsupported_reason(self, node) -> str:
        return "no converter in Torch-TensorRT's registry accepts this node"

    def partition(self, gm) -> list[list[str]]:
        blocks, _ = self._phases.partition(gm, self.compilation_settings)
        return blocks

    def convert(self, name: str, module, args: tuple, out: Path, compile_cfg,
                profiles: list[dict[str, list]] | None = None) -> dict[str, Any]:
        # Torch-TensorRT reads min/opt/max from the lowered program's symbolic shapes itself.
        import torch

        start = time.perf_counter()
        result = self._phases.convert(module, self.compilation_settings, self.values)
        seconds = time.perf_counter() - start
        engine = out / f"{name}.engine"
        engine.write_bytes(result.pop("engine"))
        torch.save(result.pop("symbolic_shape_expressions"), out / f"{name}.shapes.pt")
        outputs = module(*args)
        return {"name": name, "engine": engine.name, "shapes": f"{name}.shapes.pt", "build_seconds": seconds,
                "inputs": [value_info(a) for a in args], "outputs": [value_info(o) for o in outputs], **result,
                **self._quantized(module, compile_cfg)}

    def _quantized(self, module, compile_cfg) -> dict[str, Any]:
        """The shares of the segment's compute that read modelopt's quantize ops (int8/fp8 jobs)."""
        precision = compile_cfg.precision
        if self.quantization_route(precision) != "module":
            return {}
        from pipeline.quantize import torch_modelopt

        return {"quantizer": "modelopt", precision: torch_modelopt.fractions(module, precision)}

    def build(self, segment: dict[str, Any], convert_dir: Path, out: Path, compile_cfg) -> dict[str, Any]:
        for key in ("engine", "shapes"):
            link_or_copy(convert_dir / segment[key], out / segment[key])
        description = out / f"{segment['name']}.engine.json"
        write_json(description, {"library": "torch_tensorrt", "settings": self.build_settings().get("translated"),
                                 "input_names": segment["input_names"], "output_names": segment["output_names"],
                                 "inputs": segment["inputs"], "outputs": segment["outputs"]})
        # Strongly typed: the engine computes in the dtypes its bindings carry, and in int8/fp8
        # where layers read quantize ops (TensorRT's Q/DQ layers).
        dtypes = {t["dtype"] for t in segment["inputs"] + segment["outputs"]} & ENGINE_DTYPES
        for precision in self.quantizes_module:
            if (segment.get(precision) or {}).get(f"{precision}_ops"):
                dtypes.add(compute_dtype(precision))
        return {**segment, "network": description.name, "precision": sorted(dtypes)}

    def load_engine(self, segment: dict[str, Any], build_dir: Path, options: dict[str, Any]):
        import torch

        if not options.get("trusted"):  # hybrid.assemble decides (pipeline.load: trusted=True or your own build)
            raise ArtifactError(f"{build_dir / segment['shapes']} is a pickle from an untrusted folder.",
                                "load it with pipeline.load(run_dir, trusted=True) only if you trust its author.")
        meta = dict(segment)
        # sympy expressions: a pickle, so only ever unpickled from a trusted folder (checked above).
        meta["symbolic_shape_expressions"] = torch.load(build_dir / segment["shapes"], weights_only=False)
        return self._phases.engine_module((build_dir / segment["engine"]).read_bytes(), meta,
                                          self.compilation_settings, segment["name"])

    def package(self, gm, example, out: Path) -> str:
        path = out / "program.ep"
        self._phases.save(gm, path, example.args, example.kwargs)
        return path.name

    def load_package(self, path: Path):
        symbolic.check_file(path)  # torch.export.load inside sympifies its shape expressions
        return self._phases.load(path)


TARGET = TorchTensorRTTarget
