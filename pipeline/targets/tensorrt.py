"""TensorRT through its ONNX parser, with the full `tensorrt` library or `tensorrt_rtx`.

Segments are exported to ONNX exactly as for ONNX Runtime (OnnxTarget); the engine is
built from that file by the chosen library. TensorRT-RTX builds ahead of time with no
GPU at all (engines then run only on compute capability 8.0, 8.6, 8.9 and 12.x); the
full TensorRT builds for, and on, the GPU it will run on.

Op support: the parser cannot be asked about one aten op, only about a whole ONNX
model, so partitioning keeps OnnxTarget's answer (what the exporter converts) and the
parser's verdict is recorded per segment instead: convert runs `supports_model_v2` on
each exported segment and stores a `parser_support` report (its subgraphs and the
nodes it rejects, with the aten op each came from), and build fails with a one-line
CompileError naming the rejected ONNX op and the aten op to keep in PyTorch.

Networks are created strongly typed (TensorRT 11 and TensorRT-RTX know no other kind): the
precision of the engine is the precision of the exported graph, so build reports the
dtypes the network actually computes in. TensorRT's logger is one per process, so one
collecting logger per library is shared by every builder, parser and runtime here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ArtifactError, CompileError, ConfigError, TargetUnavailable
from pipeline.store import write_json
from pipeline.targets.onnx_export import OnnxTarget

LIBRARIES = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
# Compute capabilities TensorRT-RTX engines run on (12.x: every Blackwell consumer part).
RTX_RUNS_ON = ("8.0", "8.6", "8.9")
# trt.DataType names -> torch dtype names, as the rest of the pipeline writes dtypes.
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8",
          "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8",
          "FP8": "float8_e4m3fn", "FP4": "float4_e2m1fn_x2", "E8M0": "float8_e8m0fnu", "INT4": "int4"}
FX_TARGET = re.compile(r"target=torch\.ops\.([\w.]+)")


def dtype_name(dtype) -> str:
    return DTYPES.get(dtype.name, dtype.name.lower())


def tensor_info(tensor) -> dict[str, Any] | None:
    if tensor is None:  # an optional input left empty
        return None
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}


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
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def onnx_node_origins(path: Path) -> list[tuple[str, str, str | None]]:
    """(name, op type, aten op it was exported from) of each top-level node, by index."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        match = FX_TARGET.search(meta.get("pkg.torch.onnx.fx_node", ""))
        out.append((node.name, node.op_type, match.group(1) if match else None))
    return out


def parser_errors(parser, origins: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        index = err.node()
        aten = origins[index][2] if 0 <= index < len(origins) else None
        errors.append({"node": err.node_name() or None, "op_type": err.node_operator() or None,
                       "aten_op": aten, "code": err.code().name,
                       "error": f"{err.desc()} (in {err.func()})"})
    return errors


class TensorRTEngine(torch.nn.Module):
    """One segment running as a TensorRT engine on the current CUDA device."""

    def __init__(self, path: Path, library: str, input_names: list[str], output_names: list[str]):
        super().__init__()
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
        self.dtypes = {n: getattr(torch, dtype_name(self.engine.get_tensor_dtype(n))) for n in names}
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

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
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

    def extra_repr(self) -> str:
        return f"{self.path}, library={self.library}"


class TensorRTTarget(OnnxTarget):
    name = "tensorrt"
    libraries = ("onnx", "onnxscript", "tensorrt", "tensorrt_rtx")

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        choice = settings.get("library", "auto")
        if choice not in ("auto", *LIBRARIES):
            raise ConfigError(f"target.library={choice!r} is not a TensorRT library.",
                              "use target.library=auto, tensorrt or tensorrt_rtx.")
        self.library = choice
        if choice == "auto":
            self.library = "tensorrt" if importlib.util.find_spec("tensorrt") else "tensorrt_rtx"
        if importlib.util.find_spec(self.library) is None:
            raise TargetUnavailable(f"target.library={self.library} but {self.library} is not installed.",
                                    f"pip install {self.library.replace('_', '-')}, or use target.library=auto.")
        if self.library == "tensorrt_rtx" and settings.get("timing_cache"):
            raise ConfigError("target.timing_cache is set, but TensorRT-RTX has no timing cache "
                              "(any timing-cache call breaks its CPU-only build).",
                              "remove target.timing_cache, or use target.library=tensorrt.")
        if self.library == "tensorrt" and settings.get("compute_capabilities"):
            raise ConfigError("target.compute_capabilities is set, but full TensorRT builds for the GPU it runs on.",
                              "remove target.compute_capabilities, or use target.library=tensorrt_rtx.")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if any(importlib.util.find_spec(lib) for lib in LIBRARIES):
            return None
        return "neither tensorrt nor tensorrt_rtx is installed (pip install tensorrt-rtx)"

    def device(self) -> str:
        return "cuda"

    def can_execute(self, library: str | None = None) -> str | None:
        """None if engines of `library` (default: this target's) can run here, else why not."""
        library = library or self.library
        capability = gpu_capability()
        if capability is None:
            return f"no CUDA GPU here (torch.cuda.is_available() is False); {LIBRARIES[library]} engines run on GPUs"
        if library == "tensorrt_rtx":
            gpu = f"{torch.cuda.get_device_name()} (compute capability {capability})"
            if capability not in RTX_RUNS_ON and not capability.startswith("12."):
                return f"TensorRT-RTX engines do not run on {gpu}: only on 8.0, 8.6, 8.9 and 12.x"
            wanted = self.settings.get("compute_capabilities") or []
            if wanted and capability not in wanted:
                return f"the engines were built for compute capabilities {', '.join(wanted)}, not for {gpu}"
        return None

    def parser_support(self, onnx_path: Path) -> dict[str, Any]:
        """The parser's verdict on a whole ONNX model: its subgraphs and the nodes it rejects."""
        trt = importlib.import_module(self.library)
        log = logger(self.library)
        builder = trt.Builder(log)
        network = builder.create_network(self._network_flags(trt))
        parser = trt.OnnxParser(network, log)
        supported = parser.supports_model_v2(onnx_path.read_bytes(), str(onnx_path))
        subgraphs = [{"supported": parser.is_subgraph_supported(i), "num_nodes": len(parser.get_subgraph_nodes(i))}
                     for i in range(parser.num_subgraphs)]
        origins = onnx_node_origins(onnx_path)
        return {"library": self.library, "supported": bool(supported), "num_nodes": len(origins),
                "subgraphs": subgraphs, "unsupported_nodes": parser_errors(parser, origins)}

    def convert(self, name: str, module, args: tuple, out: Path, compile_cfg,
                profiles: list[dict[str, list]] | None = None) -> dict[str, Any]:
        entry = super().convert(name, module, args, out, compile_cfg, profiles)
        entry["parser_support"] = self.parser_support(out / entry["onnx"])
        return entry

    @staticmethod
    def _network_flags(trt) -> int:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    @staticmethod
    def _strongly_typed(trt, network) -> bool:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return flag is not None and bool(network.get_flag(flag))

    def _builder_config(self, trt, builder, compile_cfg):
        config = builder.create_builder_config()
        config.builder_optimization_level = int(compile_cfg.optimization_level)
        if compile_cfg.workspace_size > 0:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(compile_cfg.workspace_size))
        # Layer details in the plan make the engine inspector's report worth reading.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        wanted = list(self.settings.get("compute_capabilities") or [])
        if wanted:
            known = {m.removeprefix("SM"): v for m, v in trt.ComputeCapability.__members__.items()
                     if m.startswith("SM")}
            config.num_compute_capabilities = len(wanted)
            for i, cc in enumerate(wanted):
                value = known.get(str(cc).replace(".", ""))
                if value is None or not config.set_compute_capability(value, i):
                    choices = ", ".join(f"{k[:-1]}.{k[-1]}" for k in known)
                    raise ConfigError(f"target.compute_capabilities has {cc!r}, which TensorRT-RTX cannot target.",
                                      f"use some of: {choices}.")
        return config

    def _set_timing_cache(self, config) -> Path | None:
        if not self.settings.get("timing_cache"):
            return None
        path = Path(self.settings["timing_cache"]).expanduser()
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):  # made on another GPU or version
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        return path

    def build(self, segment: dict[str, Any], convert_dir: Path, out: Path, compile_cfg) -> dict[str, Any]:
        trt = importlib.import_module(self.library)
        label, name = LIBRARIES[self.library], segment["name"]
        if self.library == "tensorrt" and gpu_capability() is None:
            raise TargetUnavailable("full TensorRT builds engines on the GPU they run on, and there is no CUDA GPU here.",
                                    "use target.library=tensorrt_rtx to build ahead of time, or build on a GPU machine.")
        log = logger(self.library)
        mark = len(log.messages)
        onnx_path = convert_dir / segment["onnx"]
        builder = trt.Builder(log)
        network = builder.create_network(self._network_flags(trt))
        parser = trt.OnnxParser(network, log)
        if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
            errors = parser_errors(parser, onnx_node_origins(onnx_path))
            first = errors[0] if errors else {"op_type": None, "node": None, "aten_op": None,
                                              "error": (log.errors_since(mark) or ["unknown error"])[0]}
            keep = first["aten_op"] or "the aten op it comes from (partition/report.json lists them)"
            raise CompileError(
                f"{label} {trt.__version__} cannot parse segment {name}: ONNX op {first['op_type']} "
                f"(node {first['node']}, from {first['aten_op'] or 'an unknown aten op'}) failed: {first['error']}",
                f"add {keep} to compile.torch_executed_ops to keep it in PyTorch, or use target=onnxruntime.")
        if network.num_inputs != len(segment["inputs"]):
            raise ArtifactError(f"{onnx_path.name} has {network.num_inputs} inputs but segment {name} lists "
                                f"{len(segment['inputs'])}.", "run the pipeline again to rebuild the convert output.")
        config = self._builder_config(trt, builder, compile_cfg)
        # One optimization profile per input-spec profile: the segment's own shapes at min/opt/max.
        static = [{c: [spec["shape"] for spec in segment["inputs"]] for c in ("min", "opt", "max")}]
        for corners in segment.get("profiles") or static:
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                profile.set_shape(network.get_input(i).name, *(tuple(corners[c][i]) for c in ("min", "opt", "max")))
            config.add_optimization_profile(profile)
        timing_cache = self._set_timing_cache(config)

        plan = builder.build_serialized_network(network, config)
        if plan is None:
            why = (log.errors_since(mark) or ["no error was logged"])[0]
            raise CompileError(f"{label} {trt.__version__} could not build segment {name}: {why}",
                               "keep the failing ops in PyTorch with compile.torch_executed_ops, "
                               "or change compile.optimization_level / compile.workspace_size.")
        if timing_cache is not None:
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = timing_cache.with_name(f".{timing_cache.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
            os.replace(tmp, timing_cache)  # concurrent jobs each leave a whole cache
        engine_file = out / f"{name}.plan"
        engine_file.write_bytes(memoryview(plan))

        layers = [network.get_layer(i) for i in range(network.num_layers)]
        described = []
        for layer in layers:
            inputs = [tensor_info(layer.get_input(j)) for j in range(layer.num_inputs)]
            outputs = [tensor_info(layer.get_output(j)) for j in range(layer.num_outputs)]
            # Strongly typed: a layer computes in its output type (older TensorRT can say otherwise).
            precision = outputs[0]["dtype"] if outputs else None
            if getattr(layer, "precision_is_set", False):
                precision = dtype_name(layer.precision)
            described.append({"name": layer.name, "type": str(layer.type), "precision": precision,
                              "inputs": inputs, "outputs": outputs})
        dtypes = sorted({t["dtype"] for d in described for t in d["inputs"] + d["outputs"] if t})
        input_names = [network.get_input(i).name for i in range(network.num_inputs)]
        output_names = [network.get_output(i).name for i in range(network.num_outputs)]
        network_file = out / f"{name}.network.json"
        write_json(network_file, {
            "library": self.library, "library_version": trt.__version__,
            "strongly_typed": self._strongly_typed(trt, network),
            "inputs": [tensor_info(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
            "layers": described,
            "warnings": [m for s, m in log.messages[mark:] if s == "WARNING"],
        })
        return {**segment, "engine": engine_file.name, "network": network_file.name,
                "library": self.library, "library_version": trt.__version__, "precision": dtypes,
                "num_layers": len(described), "input_names": input_names, "output_names": output_names,
                "num_profiles": config.num_optimization_profiles,
                "layers": self._write_layer_information(trt, plan, out / f"{name}.layers.json")}

    def _write_layer_information(self, trt, plan, path: Path) -> str | None:
        """The engine inspector's view of the built engine, where the engine can run here."""
        if self.can_execute() is not None:
            return None
        engine = trt.Runtime(logger(self.library)).deserialize_cuda_engine(plan)
        if engine is None:
            return None
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        path.write_text(info)
        return path.name

    def load_engine(self, segment: dict[str, Any], build_dir: Path):
        library = segment.get("library", self.library)
        reason = self.can_execute(library)
        if reason:
            raise TargetUnavailable(f"the {library} engine of segment {segment['name']} cannot run here: {reason}.",
                                    "run it on a GPU the engine supports, or rebuild with target=onnxruntime.")
        return TensorRTEngine(build_dir / segment["engine"], library,
                              segment.get("input_names", []), segment.get("output_names", []))
