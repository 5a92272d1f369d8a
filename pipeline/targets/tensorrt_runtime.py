"""TensorRT engines at run time: the process-wide logger, GPU checks and the engine runner.

Shared by the tensorrt target's build (its logger, tensor descriptions) and by loading
engines on a GPU; torch and the TensorRT library are imported only when used.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

from pipeline.dtypes import tensorrt_name
from pipeline.errors import CompileError, TargetUnavailable

LIBRARIES = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}


def tensor_info(tensor) -> dict[str, Any] | None:
    if tensor is None:  # an optional input left empty
        return None
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": tensorrt_name(tensor.dtype)}


@functools.cache
def logger(library: str):
    """The process-wide logger of `library`: keeps warnings and errors, prints nothing."""
    trt = importlib.import_module(library)

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append((severity.name, msg))

        def errors_since(self, mark: int) -> list[str]:
            return [m for s, m in self.messages[mark:] if s in ("ERROR", "INTERNAL_ERROR")]

    return CollectingLogger()


def gpu_capability() -> str | None:
    from pipeline import env

    if env.gpu_absent():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


class TensorRTEngine:
    """One segment running as a TensorRT engine on the current CUDA device: tensors in, a tuple out."""

    def __init__(self, path: Path, library: str, input_names: list[str], output_names: list[str]):
        import torch

        trt = importlib.import_module(library)
        self.path = str(path)
        self.library = library
        log = logger(library)
        mark = len(log.messages)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.runtime = trt.Runtime(log)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            why = (log.errors_since(mark) or ["no error was logged"])[0]
            raise TargetUnavailable(
                f"{LIBRARIES[library]} cannot load {path.name} on {torch.cuda.get_device_name()}: {why}",
                "rebuild the engine for this GPU and library version, or run it where it was built for.")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CompileError(f"{LIBRARIES[library]} could not create an execution context for {path.name}.",
                               "free GPU memory, or rebuild with a smaller compile.workspace_size.")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input_names = input_names or [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        self.output_names = output_names or [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: getattr(torch, tensorrt_name(self.engine.get_tensor_dtype(n))) for n in names}
        # TensorRT synchronises around every launch on the legacy default stream: use our own then.
        self.stream = torch.cuda.Stream(self.device)
        # (min, max) per input per optimization profile, to pick the profile a call's shapes fit.
        self.profiles = [[tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, p))[::2]
                          for n in self.input_names] for p in range(self.engine.num_optimization_profiles)]
        self.profile = 0

    def _select_profile(self, shapes: list[tuple[int, ...]], stream) -> None:
        def fits(profile) -> bool:
            return all(len(s) == len(lo) and all(a <= d <= b for d, a, b in zip(s, lo, hi, strict=True))
                       for s, (lo, hi) in zip(shapes, profile, strict=True))

        if fits(self.profiles[self.profile]):
            return
        for index, profile in enumerate(self.profiles):
            if fits(profile):
                self.context.set_optimization_profile_async(index, stream.cuda_stream)
                self.profile = index
                return
        raise ValueError(f"{self.path}: input shapes {shapes} fit none of the engine's optimization profiles "
                         f"{self.profiles}; widen input.dims (or add input.extra_profiles) and rebuild")

    def __call__(self, *args):
        import torch

        if len(args) != len(self.input_names):
            raise ValueError(f"{self.path} takes {len(self.input_names)} inputs, got {len(args)}")
        current = torch.cuda.current_stream(self.device)
        stream = self.stream if current.cuda_stream == 0 else current
        if len(self.profiles) > 1:
            self._select_profile([tuple(a.shape) for a in args], stream)
        feeds = []  # referenced until the launch is queued; later work on `current` waits for it
        for name, arg in zip(self.input_names, args, strict=True):
            tensor = arg.detach().to(device=self.device, dtype=self.dtypes[name]).contiguous()
            feeds.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.path}: output {name} has a data-dependent shape {shape}")
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if stream is not current:
            stream.wait_stream(current)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{LIBRARIES[self.library]} failed to enqueue {self.path}")
        if stream is not current:
            current.wait_stream(stream)
        return tuple(outputs)

    def __repr__(self) -> str:
        return f"TensorRTEngine({self.path}, library={self.library})"
