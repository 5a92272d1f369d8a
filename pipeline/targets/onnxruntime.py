"""ONNX Runtime: the embedded default, runs everywhere through its CPU provider.

The engine of a segment is the model ONNX Runtime saves after its graph optimisations
(`optimized_model_filepath`), so loading it later skips no work the build did and the
optimised graph is an artifact users can inspect.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CompileError
from pipeline.targets.onnx_export import OnnxTarget

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def session_options(settings: dict[str, Any]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[settings["graph_optimization_level"]])
    opts.execution_mode = getattr(ort.ExecutionMode, MODES[settings["execution_mode"]])
    opts.intra_op_num_threads = settings["intra_op_num_threads"]
    opts.inter_op_num_threads = settings["inter_op_num_threads"]
    opts.log_severity_level = 3
    # Spinning worker threads keep burning cores after a call returns: with several engines
    # (or PyTorch ops between them) they starve the rest of the program.
    if settings.get("allow_spinning") is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings["allow_spinning"] else "0")
    return opts


class OrtEngine(torch.nn.Module):
    """One accelerated segment running in an ONNX Runtime session, called like the submodule."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        super().__init__()
        import onnxruntime as ort

        self.path = str(path)
        self.session = ort.InferenceSession(self.path, session_options(settings),
                                            providers=settings["providers"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: a.detach().cpu().contiguous().numpy() for name, a in zip(self.input_names, args, strict=False)}
        return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))

    def extra_repr(self) -> str:
        return f"{self.path}, providers={self.session.get_providers()}"


class OnnxRuntimeTarget(OnnxTarget):
    name = "onnxruntime"
    libraries = ("onnx", "onnxscript", "onnxruntime")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install onnxruntime)"
        return None

    def device(self) -> str:
        gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
        return "cuda" if gpu & set(self.settings["providers"]) else "cpu"

    def _check_providers(self) -> None:
        import onnxruntime as ort

        missing = [p for p in self.settings["providers"] if p not in ort.get_available_providers()]
        if missing:
            raise CompileError(
                f"onnxruntime here has no {', '.join(missing)} (available: {', '.join(ort.get_available_providers())}).",
                "set target.providers to available ones, or install onnxruntime-gpu for CUDA.",
            )

    def build(self, segment: dict[str, Any], convert_dir: Path, out: Path, compile_cfg) -> dict[str, Any]:
        import onnxruntime as ort

        self._check_providers()
        engine = out / f"{segment['name']}.ort.onnx"
        opts = session_options(self.settings)
        opts.optimized_model_filepath = str(engine)
        try:
            session = ort.InferenceSession(str(convert_dir / segment["onnx"]), opts,
                                           providers=self.settings["providers"])
        except Exception as err:  # onnxruntime raises its own exception types per failure
            raise CompileError(
                f"onnxruntime could not build segment {segment['name']}: {str(err).splitlines()[0]}",
                "an op or dtype has no kernel in the chosen provider: use compile.precision=fp32 "
                "on CPU, keep the op in PyTorch with compile.torch_executed_ops, or pick another provider.",
            ) from err
        return {**segment, "engine": engine.name, "providers": session.get_providers()}

    def load_engine(self, segment: dict[str, Any], build_dir: Path):
        return OrtEngine(build_dir / segment["engine"], self.settings)
