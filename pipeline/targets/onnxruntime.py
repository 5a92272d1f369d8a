"""ONNX Runtime: the embedded default, runs everywhere through its CPU provider.

The engine of a segment is the model ONNX Runtime saves after its graph optimisations
(`optimized_model_filepath`), so loading it later skips no work the build did and the
optimised graph is an artifact users can inspect. Thread counts, execution mode and
spinning are session options: they are applied when an engine is loaded, from the job
that loads it, and are in no cache key.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import CompileError
from pipeline.targets import TargetSettings
from pipeline.targets.onnx_base import OnnxTarget

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


@dataclass
class Settings(TargetSettings):
    name: str = "onnxruntime"
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    # disable | basic | extended | all
    graph_optimization_level: str = "all"
    # 0 lets ONNX Runtime choose (one thread per physical core).
    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    # sequential | parallel
    execution_mode: str = "sequential"
    # Let idle worker threads spin: lower latency for one session alone, but they steal the
    # cores from PyTorch ops and other engines of a hybrid program. None: spin only when the
    # whole program is a single engine.
    allow_spinning: bool | None = None
    # ONNX opset for the exporter; None uses torch.onnx's default.
    opset: int | None = None


def session_options(settings: dict[str, Any], allow_spinning: bool | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[settings["graph_optimization_level"]])
    opts.execution_mode = getattr(ort.ExecutionMode, MODES[settings["execution_mode"]])
    opts.intra_op_num_threads = settings["intra_op_num_threads"]
    opts.inter_op_num_threads = settings["inter_op_num_threads"]
    opts.log_severity_level = 3
    # Spinning worker threads keep burning cores after a call returns: with several engines
    # (or PyTorch ops between them) they starve the rest of the program.
    if allow_spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return opts


class OrtSession:
    """One accelerated segment running in an ONNX Runtime session: tensors in, a tuple out."""

    def __init__(self, path: Path, settings: dict[str, Any], allow_spinning: bool | None):
        import onnxruntime as ort

        self.path = str(path)
        self.session = ort.InferenceSession(self.path, session_options(settings, allow_spinning),
                                            providers=settings["providers"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *args):
        import torch

        feeds = {name: a.detach().cpu().contiguous().numpy() for name, a in zip(self.input_names, args, strict=False)}
        return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))

    def __repr__(self) -> str:
        return f"OrtSession({self.path}, providers={self.session.get_providers()})"


class OnnxRuntimeTarget(OnnxTarget):
    name = "onnxruntime"
    Settings = Settings
    libraries = ("onnx", "onnxscript", "onnxruntime")
    runtime_settings = ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "allow_spinning")

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

    def runtime_options(self, gm) -> dict[str, Any]:
        from pipeline import segments

        spinning = self.settings.get("allow_spinning")
        if spinning is None:  # auto: spin only for a lone engine with no PyTorch ops around it
            spinning = (len(segments.accelerated(gm)) == 1
                        and not any(segments.is_compute(n) for n in gm.graph.nodes))
        return {"allow_spinning": spinning}

    def load_engine(self, segment: dict[str, Any], build_dir: Path, options: dict[str, Any]):
        return OrtSession(build_dir / segment["engine"], self.settings, options.get("allow_spinning"))


TARGET = OnnxRuntimeTarget
