"""The two artifacts of target=inductor, built and loaded: an AOTInductor package or torch.compile's cache.

`aoti`: one `.pt2` package holding the compiled library and its weights; it loads with
no compiler and no Python tracing, but holds no CUDA graph.

`compile_cache`: the segment's exported program, its example inputs, and the portable
artifacts torch.compile wrote while compiling it (torch.compiler.save_cache_artifacts:
Inductor's FX graph cache, AOTAutograd's cache, autotuning results, Triton kernels).
Loading hot-loads those artifacts (load_cache_artifacts) and compiles again, which now
finds every kernel and autotuning choice in the caches: seconds instead of minutes, with
the same kernels, CUDA graphs included. It needs torch.compile's toolchain where it
loads (Triton on GPUs, a C++ compiler on CPUs) and the same torch and GPU; the cache key
has both.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def as_tuple(out) -> tuple:
    """The hybrid graph indexes segment outputs: always hand back a tuple."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class AotiRunner:
    """A loaded `.pt2` package: tensors in, a tuple of tensors out."""

    def __init__(self, path: Path):
        import torch._inductor

        self.path = str(path)
        self.runner = torch._inductor.aoti_load_package(self.path)

    def __call__(self, *args):
        return as_tuple(self.runner(*args))

    def __repr__(self) -> str:
        return f"AotiRunner({self.path})"


def place(module, args: tuple, device: str, memory_format: str):
    """The module and its inputs on `device`, 4-D tensors in `memory_format` (channels_last for convolutions)."""
    import torch

    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    module = module.to(device)
    if memory_format == "channels_last":
        module = module.to(memory_format=fmt)
    return module, tuple(convert(a, device, fmt) for a in args)


def convert(a, device: str, fmt):
    import torch

    if not isinstance(a, torch.Tensor):
        return a
    a = a.to(device)
    return a.contiguous(memory_format=fmt) if a.dim() == 4 and fmt != torch.contiguous_format else a


class CompiledRunner:
    """torch.compile of a segment's program, compiled on first use (hot from loaded caches)."""

    def __init__(self, program_path: Path, settings: dict[str, Any], dynamic: bool):
        import torch

        from pipeline import programs

        self.path = str(program_path)
        self.settings = settings
        module = programs.without_input_checks(programs.load_program(program_path).module())  # never unpickles
        self.module, _ = place(module, (), settings["device"], settings["memory_format"])
        self.format = torch.channels_last if settings["memory_format"] == "channels_last" else torch.contiguous_format
        self.cudagraphs = settings["device"] == "cuda" and settings["mode"] in CUDAGRAPH_MODES
        self.compiled = torch.compile(self.module, mode=None if settings["mode"] == "default" else settings["mode"],
                                      dynamic=dynamic or None)

    def __call__(self, *args):
        import torch

        args = tuple(convert(a, self.settings["device"], self.format) for a in args)
        if not self.cudagraphs:
            return as_tuple(self.compiled(*args))
        # CUDA-graph outputs live in the graph's pool and the next replay overwrites them:
        # a step mark per call, and copies for the caller (a few KB for logits).
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in as_tuple(self.compiled(*args)))

    def __repr__(self) -> str:
        return f"CompiledRunner({self.path}, mode={self.settings['mode']}, memory_format={self.settings['memory_format']})"


def load_args(path: Path, device: str) -> tuple:
    """The example inputs a segment was compiled with: tensors only (weights-only unpickler)."""
    import torch

    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in torch.load(path, weights_only=True))


def warm(runner: CompiledRunner, args: tuple) -> float:
    """Call once (twice with CUDA graphs: record, then replay) so compiling is done before timing; seconds."""
    import torch

    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(2 if runner.cudagraphs else 1):
            runner(*args)
    if runner.settings["device"] == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def build_compile_cache(segment: dict[str, Any], convert_dir: Path, out: Path, settings: dict[str, Any]):
    """Compile the segment with torch.compile and keep what a fresh process needs to load it hot."""
    import shutil

    import torch

    name = segment["name"]
    shutil.copyfile(convert_dir / segment["program"], out / segment["program"])
    shutil.copyfile(convert_dir / segment["args"], out / segment["args"])
    torch.compiler.reset()  # artifacts of this compile only (the stage worker is fresh anyway)
    runner = CompiledRunner(out / segment["program"], settings, dynamic=is_dynamic(segment))
    seconds = warm(runner, load_args(out / segment["args"], settings["device"]))
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch.compile recorded no cache artifacts (is torch.compile's caching disabled?)")
    blob, info = saved
    engine = out / f"{name}.compile-cache.bin"
    engine.write_bytes(blob)
    kinds = {kind: len(keys) for kind, keys in info.artifacts.items()} if info is not None else {}
    return {"engine": engine.name, "bytes": engine.stat().st_size, "compile_seconds": round(seconds, 3),
            "artifacts": kinds}


def load_compile_cache(segment: dict[str, Any], build_dir: Path, settings: dict[str, Any]) -> CompiledRunner:
    """Hot-load the segment's cache artifacts, then compile and warm it (finding every kernel cached)."""
    import torch

    torch.compiler.load_cache_artifacts((build_dir / segment["engine"]).read_bytes())
    runner = CompiledRunner(build_dir / segment["program"], settings, dynamic=is_dynamic(segment))
    runner.ready_seconds = warm(runner, load_args(build_dir / segment["args"], settings["device"]))
    return runner


def is_dynamic(segment: dict[str, Any]) -> bool:
    """Any input size differs across the segment's profiles: compile once for all sizes."""
    return any(p["min"] != p["max"] for p in segment.get("profiles") or [])
