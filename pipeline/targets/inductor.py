"""AOTInductor: the whole graph compiled ahead of time into one shared library.

Inductor takes any aten graph, so partition makes one segment of the whole program and
a sweep over `target=onnxruntime,inductor,eager` compares PyTorch's own compiler with
the others on the same harness. Convert re-exports the segment as a torch.export
program (AOTInductor compiles ExportedPrograms only); build packages the compiled
library and its weights as one `.pt2` that loads in any process without recompiling.
Engines run on the CPU: the segment is exported with the CPU example inputs it captured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ArtifactError, CompileError
from pipeline.targets import Target, TargetSettings
from pipeline.targets.onnx_base import value_info


@dataclass
class Settings(TargetSettings):
    """AOTInductor: the whole graph as one ahead-of-time compiled library (CPU)."""

    name: str = "inductor"
    # Benchmark kernel and GEMM template choices at build time: slower builds, maybe faster engines.
    max_autotune: bool = False


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class AotiRunner:
    """A loaded `.pt2` package: tensors in, a tuple of tensors out."""

    def __init__(self, path: Path):
        import torch._inductor

        self.path = str(path)
        self.runner = torch._inductor.aoti_load_package(self.path)

    def __call__(self, *args):
        out = self.runner(*args)
        # The hybrid graph indexes segment outputs: always hand back a tuple.
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def __repr__(self) -> str:
        return f"AotiRunner({self.path})"


class InductorTarget(Target):
    name = "inductor"
    Settings = Settings
    libraries = ("torch",)
    # An AOTInductor package is a shared library: loading it runs its code.
    engines_are_code = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        # AOTInductor writes C++ and compiles it at build time; ask Inductor's own compiler search.
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler as err:
            return (f"AOTInductor needs a C++ compiler and found none ({err}); install one "
                    "(apt-get install g++) or point CXX at it")
        return None

    def is_supported(self, node) -> bool:
        return node.op == "call_function"

    def converter_settings(self) -> dict[str, Any]:
        return {}  # convert only re-exports the segment; max_autotune matters to build

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
        with torch.no_grad():
            outputs = module(*args)
        return {"name": name, "program": path.name, "profiles": profiles or [],
                "inputs": [value_info(a) for a in args], "outputs": [value_info(o) for o in outputs]}

    def build(self, segment: dict[str, Any], convert_dir: Path, out: Path, compile_cfg) -> dict[str, Any]:
        import torch._inductor

        from pipeline import programs

        engine = out / f"{segment['name']}.pt2"
        started = time.perf_counter()
        program = programs.load_program(convert_dir / segment["program"])  # never unpickles
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(engine),
                inductor_configs={"max_autotune": bool(self.settings.get("max_autotune", False))})
        except Exception as err:  # Inductor and the C++ compiler fail in many ways
            raise CompileError(
                f"AOTInductor could not build segment {segment['name']}: {first_line(err)}",
                "keep the failing ops in PyTorch with compile.torch_executed_ops, or use another target.",
            ) from err
        return {**segment, "engine": engine.name, "bytes": engine.stat().st_size,
                "build_seconds": round(time.perf_counter() - started, 3)}

    def load_engine(self, segment: dict[str, Any], build_dir: Path, options: dict[str, Any]):
        if not options.get("trusted"):  # hybrid.assemble decides (pipeline.load: trusted=True or your own cache)
            raise ArtifactError(f"{build_dir / segment['engine']} is a shared library from an untrusted folder.",
                                "load it with pipeline.load(run_dir, trusted=True) only if you trust its author.")
        return AotiRunner(build_dir / segment["engine"])


TARGET = InductorTarget
