"""One ONNX Runtime session as a segment's engine: torch tensors in, torch tensors out.

On the CPU a plain `run` with NumPy views is the cheapest call. On a GPU the session is
driven through IO binding: inputs are bound where they already live (no copy through
host memory), outputs stay on the device and come back as torch tensors through DLPack,
and the CUDA provider runs on PyTorch's current stream so CUDA events on that stream time
the engine itself, as trtexec does. The same binding code runs on the CPU (device type
'cpu'), which is how the CPU-only tests exercise it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# torch dtype name -> NumPy type name IO binding declares for the buffer.
NUMPY_TYPES = {"float32": "float32", "float16": "float16", "float64": "float64", "int64": "int64",
               "int32": "int32", "int8": "int8", "uint8": "uint8", "bool": "bool_"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def provider_list(providers: list[str], device_id: int = 0, stream: int | None = None) -> list[Any]:
    """Providers with the options that keep GPU work on PyTorch's device and stream."""
    out: list[Any] = []
    for name in providers:
        if name in GPU_PROVIDERS:
            options: dict[str, str] = {"device_id": str(device_id)}
            if stream is not None:
                options.update(has_user_compute_stream="1", user_compute_stream=str(stream))
            out.append((name, options))
        else:
            out.append(name)
    return out


class OrtSession:
    """A loaded segment: `io_binding` (the GPU path, optional on the CPU) or plain runs."""

    def __init__(self, path: Path, options, providers: list[str], io_binding: bool):
        import onnxruntime as ort

        self.path = str(path)
        self.io_binding = io_binding
        stream = None
        if any(p in GPU_PROVIDERS for p in providers):
            import torch

            stream = torch.cuda.current_stream().cuda_stream
        self.session = ort.InferenceSession(self.path, options, providers=provider_list(providers, stream=stream))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.binding = None  # one IOBinding per session, made on the first bound call

    def __call__(self, *args):
        return self.bound(*args) if self.io_binding else self.plain(*args)

    def plain(self, *args):
        import torch

        feeds = {name: a.detach().cpu().contiguous().numpy() for name, a in zip(self.input_names, args, strict=False)}
        return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))

    def bound(self, *args):
        """Inputs bound in place, outputs allocated by ONNX Runtime on the inputs' device, no host copies."""
        import numpy as np
        import torch

        if self.binding is None:
            self.binding = self.session.io_binding()
        binding = self.binding
        # Cleared outputs make ORT allocate new buffers: tensors of earlier calls are never overwritten.
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        kept = []  # contiguous copies must outlive the run
        for name, a in zip(self.input_names, args, strict=False):
            a = a.detach().contiguous()
            kept.append(a)
            binding.bind_input(name, a.device.type, a.device.index or 0,
                               getattr(np, NUMPY_TYPES[str(a.dtype).removeprefix("torch.")]),
                               tuple(a.shape), a.data_ptr())
        device = args[0].device if args else torch.device("cpu")
        for name in self.output_names:
            binding.bind_output(name, device.type, device.index or 0)
        self.session.run_with_iobinding(binding)
        return tuple(torch.from_dlpack(v._get_c_value()) for v in binding.get_outputs())

    def __repr__(self) -> str:
        return f"OrtSession({self.path}, providers={self.session.get_providers()}, io_binding={self.io_binding})"
