"""One ONNX Runtime session as a segment's engine: torch tensors in, torch tensors out.

On the CPU a plain `run` with NumPy views is the cheapest call. On a GPU the session is
driven through IO binding, with no copy through host memory, on a CUDA stream of its own:
ONNX Runtime takes stream 0 (PyTorch's default) for "no stream" and would run on a stream
PyTorch's CUDA events never see, and no CUDA graph can be captured on the legacy default
stream. Each call orders the session's stream after the caller's and the caller's after
it, so events on the caller's stream time the engine itself, as trtexec does.

Two ways to bind:

- in place (`bound`): inputs bound where they live, outputs allocated by ONNX Runtime and
  handed back through DLPack. Any shape the engine takes, nothing copied on the device.
- fixed buffers (`fixed`): inputs and outputs bound once, to buffers of the engine's static
  shapes; each call copies its inputs in and clones the outputs out. This is what the CUDA
  provider's `enable_cuda_graph` needs (a captured graph replays at the addresses it was
  captured with); the clones keep earlier calls' outputs from being overwritten, the way
  PyTorch's own CUDA graph trees would otherwise surprise a caller. The same code runs on
  the CPU without a graph, which is how the CPU-only tests exercise it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import first_line

# torch dtype name -> NumPy type name IO binding declares for the buffer.
NUMPY_TYPES = {"float32": "float32", "float16": "float16", "float64": "float64", "int64": "int64",
               "int32": "int32", "int8": "int8", "uint8": "uint8", "bool": "bool_"}
# ONNX Runtime's type names of a session's outputs -> torch dtype names.
ORT_TYPES = {f"tensor({o})": t for o, t in (("float", "float32"), ("float16", "float16"), ("double", "float64"),
                                            ("int64", "int64"), ("int32", "int32"), ("int8", "int8"),
                                            ("uint8", "uint8"), ("bool", "bool"))}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def provider_list(providers: list[str], device_id: int = 0, stream: int | None = None,
                  cuda_graph: bool = False) -> list[Any]:
    """Providers with the options that keep GPU work on PyTorch's device and the session's stream."""
    out: list[Any] = []
    for name in providers:
        if name in GPU_PROVIDERS:
            options: dict[str, str] = {"device_id": str(device_id)}
            if stream is not None:
                options.update(has_user_compute_stream="1", user_compute_stream=str(stream))
            if cuda_graph and name == "CUDAExecutionProvider":
                options["enable_cuda_graph"] = "1"
            out.append((name, options))
        else:
            out.append(name)
    return out


def bind(bind_fn, name: str, tensor) -> None:
    """`binding.bind_input` or `bind_output` of `name` to `tensor`'s memory, where it lives."""
    import numpy as np

    bind_fn(name, tensor.device.type, tensor.device.index or 0,
            getattr(np, NUMPY_TYPES[str(tensor.dtype).removeprefix("torch.")]), tuple(tensor.shape), tensor.data_ptr())


def static_outputs(session) -> str | None:
    """Why the session's outputs have no fixed shapes and dtypes to bind buffers to; None when they do."""
    for o in session.get_outputs():
        if o.type not in ORT_TYPES:
            return f"output {o.name} is {o.type}, which IO binding here does not allocate"
        if not all(isinstance(d, int) for d in o.shape):
            return f"output {o.name} has shape {o.shape}, not fixed in the ONNX graph"
    return None


class OrtSession:
    """A loaded segment: IO binding (in place, or fixed buffers with a CUDA graph on a GPU) or plain runs.

    `note` says why a CUDA graph that was asked for is not replayed, where it is not.
    """

    def __init__(self, path: Path, options, providers: list[str], io_binding: bool, fixed: bool = False):
        import onnxruntime as ort

        self.path, self.options, self.providers = str(path), options, providers
        self.io_binding = io_binding or fixed
        self.fixed = fixed
        self.stream = None
        if any(p in GPU_PROVIDERS for p in providers):
            import torch

            self.stream = torch.cuda.Stream()
        self.cuda_graph = fixed and self.stream is not None and "CUDAExecutionProvider" in providers
        self.note: str | None = None
        self.session = self._open(ort)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if fixed and (why := static_outputs(self.session)):
            self._fall_back(why, keep_buffers=False)
        self.binding = None  # one IOBinding per session, made on the first bound call
        self.buffers: tuple[list, list] | None = None  # fixed: (inputs, outputs), made on the first call

    def _open(self, ort):
        stream = self.stream.cuda_stream if self.stream is not None else None
        return ort.InferenceSession(self.path, self.options,
                                    providers=provider_list(self.providers, stream=stream, cuda_graph=self.cuda_graph))

    def _fall_back(self, why: str, keep_buffers: bool = True) -> None:
        """No CUDA graph from here on (and no fixed buffers unless `keep_buffers`), saying why."""
        import onnxruntime as ort

        if self.cuda_graph:
            self.note = f"{Path(self.path).name}: no CUDA graph ({why}); it runs without one"
            self.cuda_graph = False
            self.session = self._open(ort)
            self.binding = self.buffers = None
        self.fixed = self.fixed and keep_buffers

    def __call__(self, *args):
        if not self.io_binding:
            return self.plain(*args)
        if self.stream is None:
            return self.run(*args)
        import torch

        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)  # the inputs were written on the caller's stream
        with torch.cuda.stream(self.stream):
            outputs = self.run(*args)
        caller.wait_stream(self.stream)
        for o in outputs:  # made on the session's stream, used and freed on the caller's
            o.record_stream(caller)
        return outputs

    def run(self, *args):
        return self.fixed_call(*args) if self.fixed else self.bound(*args)

    def plain(self, *args):
        import torch

        feeds = {name: a.detach().cpu().contiguous().numpy() for name, a in zip(self.input_names, args, strict=False)}
        return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))

    def bound(self, *args):
        """Inputs bound in place, outputs allocated by ONNX Runtime on the inputs' device, no host copies."""
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
            bind(binding.bind_input, name, a)
        device = args[0].device if args else torch.device("cpu")
        for name in self.output_names:
            binding.bind_output(name, device.type, device.index or 0)
        self.session.run_with_iobinding(binding)
        return tuple(torch.from_dlpack(v._get_c_value()) for v in binding.get_outputs())

    def fixed_call(self, *args):
        """Inputs copied into the bound buffers, one run (a graph replay once captured), outputs cloned out."""
        if self.buffers is None:
            self.buffers = self._bind_buffers(args)
        inputs, outputs = self.buffers
        for name, buffer, a in zip(self.input_names, inputs, args, strict=True):
            if tuple(a.shape) != tuple(buffer.shape):
                raise ValueError(f"{Path(self.path).name}: input {name} has shape {tuple(a.shape)}; this engine "
                                 f"was built for {tuple(buffer.shape)} only")
            buffer.copy_(a)
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as err:  # a capture that fails (an op the graph cannot hold) raises ORT's own types
            if not self.cuda_graph:
                raise
            self._fall_back(first_line(err))
            return self.fixed_call(*args)
        return tuple(o.clone() for o in outputs)

    def _bind_buffers(self, args) -> tuple[list, list]:
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if self.stream is not None else torch.device("cpu")
        self.binding = binding = self.session.io_binding()
        inputs = [torch.empty(tuple(a.shape), dtype=a.dtype, device=device) for a in args]
        for name, t in zip(self.input_names, inputs, strict=True):
            bind(binding.bind_input, name, t)
        outputs = [torch.empty(tuple(o.shape), dtype=getattr(torch, ORT_TYPES[o.type]), device=device)
                   for o in self.session.get_outputs()]
        for name, t in zip(self.output_names, outputs, strict=True):
            bind(binding.bind_output, name, t)
        return inputs, outputs

    def __repr__(self) -> str:
        return (f"OrtSession({self.path}, providers={self.session.get_providers()}, io_binding={self.io_binding}, "
                f"fixed_buffers={self.fixed}, cuda_graph={self.cuda_graph})")
