"""PyTorch's own compiler: the whole graph compiled by Inductor, on the CPU or a CUDA GPU.

Inductor takes any aten graph, so partition makes one segment of the whole program and
a sweep over `target=onnxruntime,inductor,eager` compares PyTorch's compiler with the
others on the same harness. Convert re-exports the segment as a torch.export program on
the engines' device and keeps its example inputs; build makes one of two artifacts
(pipeline/targets/inductor_runtime.py says what each holds):

- `aoti`: an AOTInductor package, the default on the CPU: self-contained, loads with no
  compiler.
- `compile_cache`: the program plus torch.compile's portable cache artifacts, the default
  on CUDA: AOTInductor packages cannot hold the CUDA graphs that modes max-autotune and
  reduce-overhead use, and loading any AOTInductor package segfaults with some PyTorch
  builds (2.11+cu130 on H100 and H200). A fresh process loads it hot in seconds.

`target.artifact` picks one explicitly; `choose_artifact` is the rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline import shapes
from pipeline.errors import ArtifactError, CompileError, ConfigError, first_line
from pipeline.quantize import torchao_gpu
from pipeline.quantize.pt2e import QUANTIZER
from pipeline.schema import choice
from pipeline.targets import DEVICES, Target, TargetSettings
from pipeline.targets.inductor_runtime import CUDAGRAPH_MODES
from pipeline.targets.onnx_base import value_info

MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ARTIFACTS = ("auto", "aoti", "compile_cache")
MEMORY_FORMATS = ("contiguous", "channels_last")


@dataclass
class Settings(TargetSettings):
    """Inductor, named as torch.compile names its settings."""

    name: str = "inductor"
    # auto: CUDA where torch sees a GPU, else the CPU.
    device: str = choice("auto", DEVICES)
    # torch.compile's mode: auto | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    # (on CUDA, reduce-overhead and max-autotune replay CUDA graphs). auto: reduce-overhead for
    # static shapes on CUDA, default elsewhere (choose_mode says why); max-autotune is never
    # chosen for you: its compile costs minutes.
    mode: str = choice("auto", MODES)
    # Why `mode` is what it is (filled in when the job settles its target; not a setting).
    mode_reason: str = ""
    # contiguous | channels_last: weights and 4-D inputs in this layout (GPU convolutions prefer channels_last).
    memory_format: str = choice("contiguous", MEMORY_FORMATS)
    # auto | aoti | compile_cache: auto is aoti on the CPU, compile_cache on CUDA.
    artifact: str = choice("auto", ARTIFACTS)
    # AOTInductor packages: Inductor's `freezing` (weights folded in as constants, inference only).
    # None: on for the CPU, where oneDNN then prepacks convolution and GEMM weights (ResNet-50
    # fp32 on this project's 2-core CPU: 60.3 -> 40.4 ms p50), off on CUDA.
    freezing: bool | None = None


def choose_artifact(settings: dict[str, Any]) -> str:
    """The artifact build makes: asked for, or by device; refusing the pairs that cannot work."""
    asked, device, mode = settings["artifact"], settings["device"], settings["mode"]
    # artifact, mode and memory_format are among their choices (Settings, checked before any stage).
    chosen = asked if asked != "auto" else ("compile_cache" if device == "cuda" else "aoti")
    if chosen == "aoti" and device == "cuda" and mode in CUDAGRAPH_MODES:
        raise ConfigError(f"target.mode={mode} replays CUDA graphs, which an AOTInductor package cannot hold.",
                          "use target.artifact=compile_cache (the default on CUDA), or "
                          "target.mode=max-autotune-no-cudagraphs.")
    if chosen != "aoti" and settings.get("freezing"):
        raise ConfigError("target.freezing is an AOTInductor setting, and this build makes a compile_cache.",
                          "remove target.freezing, or set target.artifact=aoti.")
    if chosen == "aoti" and settings["memory_format"] != "contiguous":
        raise ConfigError("target.memory_format=channels_last is applied by torch.compile, not by AOTInductor.",
                          "use target.artifact=compile_cache, or target.memory_format=contiguous.")
    return chosen


def choose_mode(settings: dict[str, Any], dynamic_dims: list[str]) -> tuple[str, str]:
    """(torch.compile mode, why): CUDA graphs by default for static shapes on CUDA.

    A CUDA graph replays a whole call with one launch, which is what small batches lack
    (ResNet-50 fp16 batch 1 on an H200: 3.80 ms in mode default, 0.46 ms in reduce-overhead).
    Graphs are captured per input shape, so dynamic dims keep mode default.
    """
    asked = settings["mode"]
    if asked != "auto":
        return asked, f"target.mode={asked} was asked for"
    if settings["device"] != "cuda":
        return "default", "target.mode=auto: on the CPU there are no CUDA graphs to replay"
    if settings["artifact"] == "aoti":
        return "default", "target.mode=auto: an AOTInductor package cannot hold CUDA graphs"
    if dynamic_dims:
        return "default", (f"target.mode=auto: the input's dims {', '.join(dynamic_dims)} are dynamic and CUDA "
                           "graphs are captured per shape (set target.mode=reduce-overhead to capture each size met)")
    return "reduce-overhead", ("target.mode=auto: static shapes on CUDA replay CUDA graphs (one launch per call); "
                               "max-autotune stays explicit, its compile costs minutes")


class InductorTarget(Target):
    name = "inductor"
    Settings = Settings
    libraries = ("torch", "triton", "torchao")
    # AOTInductor packages are shared libraries and torch.compile's caches hold generated code.
    engines_are_code = True
    # compile.precision=int8: the CPU's PT2E route (pipeline.quantize.pt2e) or, on CUDA, torchao's
    # linears (pipeline.quantize.torchao_gpu), which also serve fp8 on compute capability 8.9+.
    quantizers = MappingProxyType({"int8": f"{QUANTIZER}; on CUDA, {torchao_gpu.INT8_QUANTIZER}",
                                   "fp8": torchao_gpu.QUANTIZER})
    dynamic_quantizer = torchao_gpu.INT8_QUANTIZER
    weight_only_quantizer = torchao_gpu.WEIGHT_ONLY_QUANTIZER

    def quantizer_refusal(self, config: dict[str, Any], precision: str) -> tuple[str, str] | None:
        """PT2E's needs (int8 on the CPU) or torchao's (CUDA), asked with the resolved device and artifact."""
        from pipeline.quantize import pt2e

        if self.settings["device"] == "cpu" and precision == "int8":
            return pt2e.refusal(config, self.settings)
        return self._torchao_refusal(config, precision)

    def _torchao_refusal(self, config: dict[str, Any], precision: str) -> tuple[str, str] | None:
        """torchao's CUDA route: its config for the mode, torchao, a GPU new enough, a compile_cache."""
        device = self.settings["device"]
        refused = torchao_gpu.refusal(precision, config["quantize"]["mode"], device)
        if refused or device == "cpu":
            return refused
        if self.settings["artifact"] != "compile_cache":
            return (f"its CUDA {precision} route builds a compile_cache, not target.artifact={self.settings['artifact']}",
                    "set target.artifact=compile_cache (or auto)")
        return None

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        self.settings["artifact"] = choose_artifact(self.settings)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        # Inductor writes C++ (CPU) and compiles it at build time; ask Inductor's own compiler search.
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler as err:
            return (f"Inductor needs a C++ compiler and found none ({err}); install one "
                    "(apt-get install g++) or point CXX at it")
        return None

    def settle(self, input_cfg) -> dict[str, str]:
        mode, why = choose_mode(self.settings, shapes.varying_dims(input_cfg))
        self.settings.update(mode=mode, mode_reason=why)
        return {"target.mode": mode, "target.mode.reason": why}

    def layer_names(self, segment: dict[str, Any], convert_dir: Path) -> tuple[set[str], list[str]]:
        """What quantize.exclude can name in this segment (module paths, as PT2E's quantizer takes them)."""
        from pipeline import programs
        from pipeline.quantize import pt2e, pt2e_sensitivity

        graph = programs.load_program(convert_dir / segment["program"]).graph_module.graph
        paths = {n: pt2e_sensitivity.module_path(n) for n in graph.nodes if n.op == "call_function"}
        compute = [p for n, p in paths.items() if p and pt2e.opname(n) in pt2e.COMPUTE]
        return {p for p in paths.values() if p}, list(dict.fromkeys(compute))

    def is_supported(self, node) -> bool:
        return node.op == "call_function"

    def converter_settings(self) -> dict[str, Any]:
        # Convert re-exports the segment on its device and keeps its inputs; the rest matters to build.
        return {"device": self.settings["device"], "files": 2}

    def convert(self, name: str, module, args: tuple, out: Path, compile_cfg,
                profiles: list[dict[str, list]] | None = None) -> dict[str, Any]:
        import torch

        from pipeline.segments import dynamic_dims

        path = out / f"{name}.program.pt2"
        try:
            with torch.no_grad():
                program = torch.export.export(module, args, dynamic_shapes=dynamic_dims(profiles), strict=False)
            torch.export.save(program, path)
        except Exception as err:  # torch.export raises many types; the message is what matters
            raise CompileError(
                f"torch.export of segment {name} failed: {first_line(err)}",
                "keep the failing ops in PyTorch with compile.torch_executed_ops, or try target=eager.",
            ) from err
        torch.save(tuple(a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args),
                   out / f"{name}.args.pt")
        with torch.no_grad():
            outputs = module(*args)
        return {"name": name, "program": path.name, "args": f"{name}.args.pt", "profiles": profiles or [],
                "inputs": [value_info(a) for a in args], "outputs": [value_info(o) for o in outputs]}

    def build(self, segment: dict[str, Any], convert_dir: Path, out: Path, compile_cfg) -> dict[str, Any]:
        from pipeline.targets import inductor_runtime

        started = time.perf_counter()
        artifact = self.settings["artifact"]
        try:
            if artifact == "compile_cache" and segment.get("quantize"):  # CUDA int8/fp8: torchao's linears
                built = self.build_torchao(segment, convert_dir, out, compile_cfg)
            elif artifact == "compile_cache":
                built = inductor_runtime.build_compile_cache(segment, convert_dir, out, self.settings)
            elif segment.get("quantize"):  # compile.precision=int8: PT2E, then an AOTInductor package
                from pipeline.quantize import pt2e

                built = pt2e.build(segment, convert_dir, out, self.settings)
            else:
                built = self.build_aoti(segment, convert_dir, out)
        except ConfigError:
            raise
        except Exception as err:  # Inductor, Triton and the C++ compiler fail in many ways
            raise CompileError(
                f"Inductor ({artifact}) could not build segment {segment['name']}: {first_line(err)}",
                "keep the failing ops in PyTorch with compile.torch_executed_ops, try target.mode=default, "
                "or use another target.",
            ) from err
        return {**segment, **built, "artifact": artifact, "device": self.settings["device"],
                "build_seconds": round(time.perf_counter() - started, 3)}

    def build_torchao(self, segment: dict[str, Any], convert_dir: Path, out: Path, compile_cfg) -> dict[str, Any]:
        """torchao's quantized linears compiled into a compile_cache; the precision read off the generated code."""
        from pipeline import programs
        from pipeline.targets import inductor_runtime

        spec = torchao_gpu.spec_of(segment["quantize"], compile_cfg.precision)
        built = inductor_runtime.build_compile_cache(segment, convert_dir, out, self.settings, quantized=spec)
        # Unlifted, as prepare() quantizes it: weights are get_attr nodes there, placeholders in graph_module.
        program = programs.load_program(convert_dir / segment["program"]).module()
        return {**built, **torchao_gpu.facts(program, spec, built.pop("generated_code"))}

    def build_aoti(self, segment: dict[str, Any], convert_dir: Path, out: Path) -> dict[str, Any]:
        import torch._inductor

        from pipeline import programs

        engine = out / f"{segment['name']}.pt2"
        program = programs.load_program(convert_dir / segment["program"])  # never unpickles
        freezing = self.settings.get("freezing")
        freezing = self.settings["device"] == "cpu" if freezing is None else bool(freezing)
        configs = {"max_autotune": self.settings["mode"].startswith("max-autotune"), "freezing": freezing}
        with torch.no_grad():  # freezing folds weights for inference only
            torch._inductor.aoti_compile_and_package(program, package_path=str(engine), inductor_configs=configs)
        built = {"engine": engine.name, "bytes": engine.stat().st_size, "freezing": freezing}
        if self.settings["device"] == "cpu":  # its C++ loops are compiled for this many OpenMP threads
            from torch._inductor.utils import parallel_num_threads

            built["threads"] = parallel_num_threads()
        return built

    def engine_threads(self, budget: int, engines: dict[str, Any]) -> int:
        """AOTInductor's CPU loops run with the thread count they were compiled for (eager then gets it too)."""
        fixed = {seg["threads"] for seg in engines["segments"] if seg.get("threads")}
        return fixed.pop() if len(fixed) == 1 else budget

    def load_engine(self, segment: dict[str, Any], build_dir: Path, options: dict[str, Any]):
        from pipeline.targets import inductor_runtime

        if not options.get("trusted"):  # hybrid.assemble decides (pipeline.load: trusted=True or your own build)
            raise ArtifactError(f"{build_dir / segment['engine']} is compiled code from an untrusted folder.",
                                "load it with pipeline.load(run_dir, trusted=True) only if you trust its author.")
        if segment.get("artifact") == "compile_cache":
            return inductor_runtime.load_compile_cache(segment, build_dir, {**self.settings,
                                                                            "device": segment["device"]})
        return inductor_runtime.AotiRunner(build_dir / segment["engine"])


TARGET = InductorTarget
