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

    def __init__(self, program_path: Path, settings: dict[str, Any], dynamic: bool,
                 quantized: dict[str, Any] | None = None):
        import torch

        from pipeline import programs

        self.path = str(program_path)
        self.settings = settings
        module = programs.without_input_checks(programs.load_program(program_path).module())  # never unpickles
        self.module, _ = place(module, (), settings["device"], settings["memory_format"])
        if quantized:  # torchao's linears (pipeline.quantize.torchao_gpu), the same at build and at load
            from pipeline.quantize import torchao_gpu

            self.module = torchao_gpu.prepare(self.module, quantized)
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


def build_compile_cache(segment: dict[str, Any], convert_dir: Path, out: Path, settings: dict[str, Any],
                        quantized: dict[str, Any] | None = None):
    """Compile the segment with torch.compile and keep what a fresh process needs to load it hot.

    `quantized`: torchao's settings (pipeline.quantize.torchao_gpu.spec_of); the result then also
    holds Inductor's generated code under "generated_code", for the caller to read and drop.
    """
    import torch

    from pipeline.files import link_or_copy

    name = segment["name"]
    for key in ("program", "args"):  # convert's files, linked: the weights are not stored twice
        link_or_copy(convert_dir / segment[key], out / segment[key])
    torch.compiler.reset()  # artifacts of this compile only (the stage worker is fresh anyway)
    runner = CompiledRunner(out / segment["program"], settings, dynamic=is_dynamic(segment), quantized=quantized)
    args = load_args(out / segment["args"], settings["device"])
    if quantized:  # the generated code shows whether the quantized GEMMs were reached
        from torch._inductor.utils import run_and_get_code

        seconds, code = run_and_get_code(warm, runner, args)
        extra = {"generated_code": "\n".join(code)}
    else:
        seconds, extra = warm(runner, args), {}
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch.compile recorded no cache artifacts (is torch.compile's caching disabled?)")
    blob, info = saved
    engine = out / f"{name}.compile-cache.bin"
    engine.write_bytes(blob)
    kinds = {kind: len(keys) for kind, keys in info.artifacts.items()} if info is not None else {}
    return {"engine": engine.name, "bytes": engine.stat().st_size, "compile_seconds": round(seconds, 3),
            "artifacts": kinds, **extra}


def load_compile_cache(segment: dict[str, Any], build_dir: Path, settings: dict[str, Any]) -> CompiledRunner:
    """Hot-load the segment's cache artifacts, then compile and warm it (finding every kernel cached)."""
    import torch

    mend_autotune_recheck()
    torch.compiler.load_cache_artifacts((build_dir / segment["engine"]).read_bytes())
    runner = CompiledRunner(build_dir / segment["program"], settings, dynamic=is_dynamic(segment),
                            quantized=segment.get("torchao"))
    runner.ready_seconds = warm(runner, load_args(build_dir / segment["args"], settings["device"]))
    return runner


def is_dynamic(segment: dict[str, Any]) -> bool:
    """Any input size differs across the segment's profiles: compile once for all sizes."""
    return any(p["min"] != p["max"] for p in segment.get("profiles") or [])


def mend_autotune_recheck() -> bool:
    """Make kernels loaded from the cache keep their coordinate-descent results (pytorch/pytorch#172819).

    Kernels come back from the FX graph cache as precompiled ("static") autotuners, which
    look their best config up in the autotune cache again. In the PyTorch builds with that
    bug (2.11 among them) the lookup skips single-config kernels and does not mark a cached
    config as found by coordinate descent, so max-autotune re-tunes those kernels on the
    first call: measured on an H100, ResNet-50 batch 32 re-tuned 13 kernels, about 10 s of
    a 24 s warm start. Replaced only where the installed method lacks the fix; True if so.
    """
    import inspect

    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    method = CachingAutotuner.recheck_autotune_cache
    if getattr(method, "mended", False) or "compile_result.config.found_by_coordesc" in inspect.getsource(method):
        return False
    recheck_autotune_cache.mended = True
    CachingAutotuner.recheck_autotune_cache = recheck_autotune_cache
    return True


def recheck_autotune_cache(self, reload_kernel_from_src) -> None:
    """Narrow a loaded kernel to its cached best config, keeping whether coordinate descent found it."""
    from torch._inductor.runtime import triton_heuristics as th

    configs = [result.config for result in self.compile_results]
    cached, _, self.autotune_cache_info = th.check_autotune_cache(configs, self.filename, self.inductor_meta)
    if self.autotune_cache_info.get("autotune_cache_state") != "hit":
        return
    best = cached[0]
    by_coordesc = getattr(best, "found_by_coordesc", False)
    wanted = th.triton_config_to_hashable(best)
    for result in self.compile_results:
        if th.triton_config_to_hashable(result.config) == wanted:
            result.config.found_by_coordesc = by_coordesc
            self.compile_results = [result]
            return
    if by_coordesc:  # tuned at run time, after the kernel was cached: compile that config now
        if self.fn.fn is None:
            self.fn = reload_kernel_from_src().fn
        self.compile_results = [self._precompile_config(best)]
