"""ONNX Runtime: the embedded default, runs everywhere through its CPU provider.

The engine of a segment is the model ONNX Runtime saves after its graph optimisations
(`optimized_model_filepath`), so loading it later skips no work the build did and the
optimised graph is an artifact users can inspect. Thread counts, execution mode and
spinning are session options: they are applied when an engine is loaded, from the job
that loads it, and are in no cache key.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline import shapes
from pipeline.errors import CompileError, ConfigError, TargetUnavailable, first_line
from pipeline.schema import bounded, choice
from pipeline.targets import DEVICES, TargetSettings, resolve_device
from pipeline.targets.onnx_base import MIN_OPSET, OnnxTarget, check_external_data
from pipeline.targets.onnxruntime_session import GPU_PROVIDERS, provider_list, static_outputs

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
GPU = ["CUDAExecutionProvider"]  # the CUDA variant's first provider (GPU_PROVIDERS: all that run on the GPU)


def available_providers() -> list[str]:
    """ONNX Runtime's providers that can start here.

    onnxruntime-gpu lists TensorrtExecutionProvider whether or not TensorRT is installed, and
    a session asked for it falls back to CUDA with only a logged warning: the job would record
    an engine TensorRT never built. The provider counts only where its library and TensorRT's
    libnvinfer both load.
    """
    import onnxruntime as ort

    found = ort.get_available_providers()
    if "TensorrtExecutionProvider" in found and not tensorrt_loads(Path(ort.__file__).parent / "capi"):
        found = [p for p in found if p != "TensorrtExecutionProvider"]
    return found


@functools.cache
def tensorrt_loads(capi: Path) -> bool:
    """Whether ONNX Runtime's TensorRT provider library and libnvinfer are here (asked once per process)."""
    import ctypes

    if not (capi / "libonnxruntime_providers_tensorrt.so").is_file():
        return False
    spec = importlib.util.find_spec("tensorrt_libs")  # pip's tensorrt puts libnvinfer there
    names = [str(Path(spec.origin).parent / "libnvinfer.so.10")] if spec and spec.origin else []
    for name in [*names, "libnvinfer.so.10"]:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@dataclass
class Settings(TargetSettings):
    name: str = "onnxruntime"
    # auto: CUDA where torch sees a GPU and onnxruntime has its CUDA provider, else the CPU.
    device: str = choice("auto", DEVICES)
    # Empty: from the device (cpu: CPU; cuda: CUDA, then CPU for what CUDA lacks). Named
    # providers decide the device themselves (TensorrtExecutionProvider or CUDA: the GPU).
    providers: list[str] = field(default_factory=list)
    # Bind inputs and outputs where they live instead of copying through NumPy (always on a GPU).
    io_binding: bool = False
    # disable | basic | extended | all
    graph_optimization_level: str = choice("all", LEVELS)
    # 0 lets ONNX Runtime choose (one thread per physical core); validate gives it validate.threads.
    intra_op_num_threads: int = bounded(0, low=0)
    inter_op_num_threads: int = bounded(0, low=0)
    # sequential | parallel
    execution_mode: str = choice("sequential", MODES)
    # Let idle worker threads spin: lower latency for one session alone, but they steal the
    # cores from PyTorch ops and other engines of a hybrid program. None: spin only when the
    # whole program is a single engine.
    allow_spinning: bool | None = None
    # ONNX opset for the exporter; None uses torch.onnx's default.
    opset: int | None = bounded(None, low=MIN_OPSET)
    # The CUDA provider replays each engine from a CUDA graph (enable_cuda_graph): one launch per
    # call. None: on for static shapes on CUDA, off otherwise (a graph holds one shape).
    cuda_graph: bool | None = None


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


class OnnxRuntimeTarget(OnnxTarget):
    name = "onnxruntime"
    Settings = Settings
    libraries = ("onnx", "onnxscript", "onnxruntime")
    runtime_settings = ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "allow_spinning",
                        "io_binding", "cuda_graph")
    # onnxruntime@tensorrt in target=auto's list: TensorRT's provider, CUDA and CPU for the rest.
    VARIANTS = {"tensorrt": ["TensorrtExecutionProvider", *GPU, "CPUExecutionProvider"],
                "cuda": [*GPU, "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"]}

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        if not self.settings.get("providers"):
            self.settings["providers"] = self.VARIANTS[self.settings.get("device", "cpu")]

    def resolve_device(self, asked: str) -> str:
        """Named providers decide; else auto is CUDA only where a GPU and the CUDA provider both exist."""
        named = self.settings.get("providers") or []
        if named:
            device = "cuda" if set(named) & set(GPU_PROVIDERS) else "cpu"
            if asked not in ("auto", device):
                raise ConfigError(f"target.device={asked} but target.providers={named} run on {device}.",
                                  "set one of them only: target.device, or target.providers.")
            return device
        device = resolve_device(asked)
        if asked == "auto" and device == "cuda" and GPU[0] not in available_providers():
            return "cpu"
        return device

    @classmethod
    def variant(cls, name: str) -> dict[str, Any] | None:
        if name not in cls.VARIANTS:
            return None
        return {"device": "cpu" if name == "cpu" else "cuda", "providers": cls.VARIANTS[name]}

    def missing_providers(self) -> tuple[list[str], list[str]]:
        """(providers this job names that onnxruntime here lacks, the providers it has)."""
        available = available_providers()
        return [p for p in self.settings["providers"] if p not in available], available

    def can_execute(self) -> str | None:
        missing, available = self.missing_providers()
        if missing:
            return (f"onnxruntime here has no {', '.join(missing)} "
                    f"(available: {', '.join(available)}; pip install -e '.[onnxruntime-gpu]')")
        return super().can_execute()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install onnxruntime)"
        return None

    def settle(self, input_cfg) -> dict[str, str]:
        """target.cuda_graph resolved, and why: graphs replay one shape, on the CUDA provider only."""
        graph, why = self.choose_cuda_graph(shapes.varying_dims(input_cfg))
        self.settings["cuda_graph"] = graph
        if self.device() != "cuda":
            return {}
        return {"target.cuda_graph": "on" if graph else "off", "target.cuda_graph.reason": why}

    def choose_cuda_graph(self, varying: list[str]) -> tuple[bool, str]:
        asked = self.settings.get("cuda_graph")
        if self.device() != "cuda":
            if asked:
                raise ConfigError("target.cuda_graph=true needs target.device=cuda: CUDA graphs replay GPU work.",
                                  "drop target.cuda_graph, or run on a GPU with onnxruntime-gpu.")
            return False, "not on CUDA"
        if asked is False:
            return False, "target.cuda_graph=false was asked for"
        if "CUDAExecutionProvider" not in self.settings["providers"][:1]:
            reason = (f"the first provider is {self.settings['providers'][0]}, not CUDAExecutionProvider "
                      "(TensorRT's provider has graphs of its own, trt_cuda_graph_enable, not wired here)")
        elif varying:
            reason = (f"the input's dims {', '.join(varying)} are dynamic, and a CUDA graph replays the one "
                      "shape it was captured with")
        else:
            return True, (("target.cuda_graph=true was asked for" if asked else "target.cuda_graph=auto: static "
                           "shapes on the CUDA provider") + "; inputs are copied into fixed buffers, one launch per call")
        if asked:
            raise ConfigError(f"target.cuda_graph=true cannot be served: {reason}.",
                              "drop target.cuda_graph (auto decides), or give static input shapes.")
        return False, f"target.cuda_graph=auto: {reason}"

    def configure(self, compile_cfg) -> None:
        """A provider this onnxruntime lacks fails here, before any stage: build needs it too."""
        self._check_providers()

    def _check_providers(self) -> None:
        missing, available = self.missing_providers()
        if missing:
            raise TargetUnavailable(
                f"onnxruntime here has no {', '.join(missing)} (available: {', '.join(available)}).",
                "set target.providers to available ones, or pip install -e '.[onnxruntime-gpu]' for CUDA "
                "(after pip uninstall onnxruntime).",
            )

    # compile.precision=int8 (pipeline.quantize.ort_qdq): how this target quantizes.
    quantizers = MappingProxyType({"int8": "onnxruntime.quantization static QDQ (quant_pre_process, quantize_static)"})
    # quantize.mode=dynamic: quantize_dynamic (int8 weights, activation scales per batch at run time).
    dynamic_quantizer = "onnxruntime.quantization quantize_dynamic (MatMulInteger/ConvInteger)"
    # compile.precision=fp8 is refused before any stage (pipeline.checks.check_quantization).
    no_quantizer = MappingProxyType({"fp8": "its CPU and CUDA providers have no FP8 convolution or GEMM kernels, "
                                            "so an FP8 QDQ model would compute in fp32"})

    def build(self, segment: dict[str, Any], convert_dir: Path, out: Path, compile_cfg) -> dict[str, Any]:
        import onnxruntime as ort

        self._check_providers()
        engine = out / f"{segment['name']}.ort.onnx"
        opts = session_options(self.settings)
        opts.optimized_model_filepath = str(engine)
        source = convert_dir / segment["onnx"]
        if segment.get("quantize"):  # compile.precision=int8: ORT's static QDQ (or dynamic) quantization first
            from pipeline.quantize import ort_qdq

            source = ort_qdq.quantize(source, out, segment["name"], segment["quantize"])
        session, no_graph = self.open_for_build(ort, source, opts, segment['name'])
        entry = {**segment, "engine": engine.name, "providers": session.get_providers()}
        if no_graph:
            entry["no_cuda_graph"] = no_graph
        if segment.get("quantize"):  # what ORT made of the QDQ graph: int8 kernels, and how much
            entry.update(ort_qdq.inspect(source, engine, segment["quantize"].example))
        return entry

    def open_for_build(self, ort, source: Path, opts, name: str):
        """(session, why its engine cannot replay a CUDA graph or None).

        On CUDA the build asks for a graph, whatever target.cuda_graph says (a runtime setting, in no
        cache key): ONNX Runtime refuses one at session creation where a node falls back to the CPU
        provider, and fixed buffers need outputs of fixed shapes. The engine file is the same either way.
        """
        providers = self.settings["providers"]
        refused = None
        if self.device() == "cuda" and providers[0] == "CUDAExecutionProvider":
            try:
                session = ort.InferenceSession(str(source), opts, providers=provider_list(providers, cuda_graph=True))
                return session, static_outputs(session)
            except Exception as err:  # onnxruntime raises its own exception types per failure
                refused = first_line(err)
        try:
            return ort.InferenceSession(str(source), opts, providers=providers), refused
        except Exception as err:
            raise CompileError(
                f"onnxruntime could not build segment {name}: {first_line(err)}",
                "an op or dtype has no kernel in the chosen provider: use compile.precision=fp32 "
                "on CPU, keep the op in PyTorch with compile.torch_executed_ops, or pick another provider.",
            ) from err

    def runtime_options(self, gm) -> dict[str, Any]:
        from pipeline import segments

        spinning = self.settings.get("allow_spinning")
        if spinning is None:  # auto: spin only for a lone engine with no PyTorch ops around it
            spinning = (len(segments.accelerated(gm)) == 1
                        and not any(segments.is_compute(n) for n in gm.graph.nodes))
        return {"allow_spinning": spinning}

    def engine_threads(self, budget: int, engines: dict[str, Any]) -> int:
        """intra_op_num_threads=0 (ONNX Runtime's own choice: every physical core) takes the budget."""
        if not self.settings.get("intra_op_num_threads"):
            self.settings["intra_op_num_threads"] = budget
        return int(self.settings["intra_op_num_threads"])

    def load_engine(self, segment: dict[str, Any], build_dir: Path, options: dict[str, Any]):
        from pipeline.targets.onnxruntime_session import OrtSession

        check_external_data(build_dir / segment["engine"], build_dir)  # before ONNX Runtime opens any of it
        opts = session_options(self.settings, options.get("allow_spinning"))
        binding = bool(self.settings.get("io_binding")) or self.device() == "cuda"
        graph = bool(self.settings.get("cuda_graph")) and self.device() == "cuda"
        session = OrtSession(build_dir / segment["engine"], opts, self.settings["providers"], binding,
                             fixed=graph and not segment.get("no_cuda_graph"))
        if graph and segment.get("no_cuda_graph"):
            session.note = f"segment {segment['name']}: no CUDA graph ({segment['no_cuda_graph']}); it runs without one"
        return session


TARGET = OnnxRuntimeTarget
