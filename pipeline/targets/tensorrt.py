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

import importlib
import importlib.util
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline.dtypes import tensorrt_name
from pipeline.errors import ArtifactError, CompileError, ConfigError, TargetUnavailable
from pipeline.files import write_json
from pipeline.quantize import tensorrt_qdq
from pipeline.schema import bounded, choice
from pipeline.targets import TargetSettings
from pipeline.targets.onnx_base import MIN_OPSET, OnnxTarget
from pipeline.targets.tensorrt_runtime import (
    LIBRARIES,
    TensorRTEngine,
    gpu_capability,
    logger,
    tensor_info,
)

# Compute capabilities TensorRT-RTX engines run on (12.x: every Blackwell consumer part).
RTX_RUNS_ON = ("8.0", "8.6", "8.9")
# FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell): what fp8 engines are built for
# when target.compute_capabilities is empty (TensorRT-RTX refuses FP8 for sm75/80/86).
FP8_CAPABILITIES = ("8.9", "12.0")
FP8_MIN = (8, 9)
FX_TARGET = re.compile(r"target=torch\.ops\.([\w.]+)")


@dataclass
class Settings(TargetSettings):
    """TensorRT through its ONNX parser; builder settings come from `compile`."""

    name: str = "tensorrt"
    # auto | tensorrt | tensorrt_rtx; auto takes the full TensorRT where it is installed.
    library: str = choice("auto", ("auto", *LIBRARIES))
    # Timing cache file, read and updated by every build (full TensorRT only: any
    # timing-cache call breaks TensorRT-RTX's CPU-only build).
    timing_cache: str | None = None
    # TensorRT-RTX only: GPUs to build for, e.g. ["8.6", "8.9", "12.0"]; [] is the library default.
    compute_capabilities: list[str] = field(default_factory=list)
    # ONNX opset for the exporter; None uses torch.onnx's default.
    opset: int | None = bounded(None, low=MIN_OPSET)
    # What writes int8/fp8 QDQ graphs: auto (modelopt where it imports, else onnxruntime),
    # modelopt (NVIDIA Model Optimizer's ONNX PTQ) or onnxruntime (ORT's quantize_static).
    quantizer: str = choice("auto", tensorrt_qdq.TOOLS)


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


def capability_tuple(text: str) -> tuple[int, ...]:
    """'8.9' -> (8, 9), for comparing compute capabilities."""
    return tuple(int(x) for x in str(text).split(".")[:2] if x.isdigit())


class TensorRTTarget(OnnxTarget):
    name = "tensorrt"
    Settings = Settings
    # nvidia-modelopt (when installed) makes the int8/fp8 QDQ graphs: its version is in the build key.
    libraries = ("onnx", "onnxscript", "tensorrt", "tensorrt_rtx", "nvidia-modelopt")
    # compile.precision=int8 (pipeline.quantize.tensorrt_qdq): a QDQ graph, strongly typed INT8 engine;
    # fp8: the same route with FLOAT8E4M3FN Q/DQ, a strongly typed FP8 engine.
    quantizers = MappingProxyType({
        "int8": "QDQ ONNX from modelopt (or onnxruntime.quantization), built as explicit INT8",
        "fp8": "FP8 (E4M3) QDQ ONNX from modelopt (or onnxruntime.quantization), built strongly typed"})

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        # library and quantizer are among their choices (Settings, checked before any stage).
        self.library = settings.get("library", "auto")
        if self.library == "auto":
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

    def converter_settings(self) -> dict[str, Any]:
        """The ONNX files, and the chosen library's parser verdict on them."""
        return {**super().converter_settings(), "library": self.library}

    def libraries_for(self, aspect: str) -> tuple[str, ...]:
        """Only the TensorRT library this target builds with changes its engines."""
        if aspect in ("lowering", "placing"):
            return super().libraries_for(aspect)
        # onnx-graphsurgeon: modelopt's ONNX quantizer imports only with it, so quantizer=auto's pick follows it.
        return ("onnx", "onnxscript", self.library, "nvidia-modelopt", "onnx-graphsurgeon")

    def quantizer_refusal(self, config: dict[str, Any], precision: str) -> tuple[str, str] | None:
        """target.quantizer=modelopt needs modelopt, and settings it can serve; FP8 needs compute
        capability >= 8.9, and its scales come from ranges, not int8's histograms."""
        if precision != "fp8":
            return tensorrt_qdq.refusal(config)
        wanted = [str(c) for c in (self.settings.get("compute_capabilities") or [])]
        old = [c for c in wanted if capability_tuple(c) < FP8_MIN]
        if old:
            return (f"FP8 needs compute capability 8.9 or newer, and target.compute_capabilities has "
                    f"{', '.join(old)}", "set target.compute_capabilities to 8.9 and/or 12.0 (or leave it empty: "
                    f"fp8 then builds for {', '.join(FP8_CAPABILITIES)})")
        method = config["calibration"]["method"]
        if method != "minmax":
            return (f"calibration.method={method} is an int8 histogram recipe; FP8 scales come from each "
                    "tensor's range (modelopt: max; onnxruntime: its distribution)", "set calibration.method=minmax")
        return tensorrt_qdq.refusal(config)

    def can_execute(self, library: str | None = None) -> str | None:
        """None if engines of `library` (default: this target's) can run here, else why not."""
        library = library or self.library
        capability = gpu_capability()
        if capability is None:
            return f"no CUDA GPU here (torch.cuda.is_available() is False); {LIBRARIES[library]} engines run on GPUs"
        if library == "tensorrt_rtx":
            import torch

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

    def _capabilities(self, precision: str) -> list[str]:
        """The compute capabilities TensorRT-RTX builds for: target.compute_capabilities, or FP8's defaults."""
        wanted = [str(c) for c in (self.settings.get("compute_capabilities") or [])]
        if not wanted and precision == "fp8" and self.library == "tensorrt_rtx":
            return list(FP8_CAPABILITIES)
        return wanted

    def _check_fp8_gpu(self, precision: str) -> None:
        """Full TensorRT builds on its GPU: FP8 needs one of compute capability 8.9 or newer."""
        capability = gpu_capability() if precision == "fp8" and self.library == "tensorrt" else None
        if capability and capability_tuple(capability) < FP8_MIN:
            raise TargetUnavailable(f"FP8 needs compute capability 8.9 or newer, and this GPU is {capability}.",
                                    "build on an Ada, Hopper or Blackwell GPU, use target.library=tensorrt_rtx, "
                                    "or compile.precision=int8.")

    def _builder_config(self, trt, builder, compile_cfg, wanted: list[str]):
        config = builder.create_builder_config()
        config.builder_optimization_level = int(compile_cfg.optimization_level)
        if compile_cfg.workspace_size > 0:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(compile_cfg.workspace_size))
        # Layer details in the plan make the engine inspector's report worth reading.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
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
        if self.library == "tensorrt" and gpu_capability() is None:
            raise TargetUnavailable("full TensorRT builds engines on the GPU they run on, and there is no CUDA GPU here.",
                                    "use target.library=tensorrt_rtx to build ahead of time, or build on a GPU machine.")
        log = logger(self.library)
        mark = len(log.messages)
        builder = trt.Builder(log)
        parsed, parse_dir, quantized = segment, convert_dir, {}
        precision = compile_cfg.precision
        capabilities = self._capabilities(precision)
        if segment.get("quantize"):  # compile.precision=int8/fp8: a QDQ graph, built strongly typed
            from pipeline.quantize import int8_facts

            self._check_fp8_gpu(precision)
            qdq, tool = tensorrt_qdq.quantize(segment, convert_dir, out, precision, self.settings.get("quantizer"))
            parsed, parse_dir = {**segment, "onnx": qdq.name}, out
            quantized = int8_facts(qdq, tool, precision, segment["quantize"].example, requantized=False)
        # The parser holds the weights the network points at: it must outlive the build.
        network, _parser = self._parse(trt, builder, parsed, parse_dir, mark)
        config = self._builder_config(trt, builder, compile_cfg, capabilities)
        self._add_profiles(builder, network, config, segment)
        plan = self._build_plan(trt, builder, network, config, segment["name"], mark)
        engine_file = out / f"{segment['name']}.plan"
        engine_file.write_bytes(memoryview(plan))
        network_file = out / f"{segment['name']}.network.json"
        description = self._describe(trt, network, mark)
        write_json(network_file, description)
        dtypes = sorted({t["dtype"] for d in description["layers"] for t in d["inputs"] + d["outputs"] if t})
        return {**segment, **quantized, "engine": engine_file.name, "network": network_file.name,
                "library": self.library, "library_version": trt.__version__, "precision": dtypes,
                "num_layers": len(description["layers"]),
                "input_names": [t["name"] for t in description["inputs"]],
                "output_names": [t["name"] for t in description["outputs"]],
                "num_profiles": config.num_optimization_profiles,
                **({"compute_capabilities": capabilities} if capabilities else {}),
                "layers": self._write_layer_information(trt, plan, out / f"{segment['name']}.layers.json")}

    def _parse(self, trt, builder, segment: dict[str, Any], convert_dir: Path, mark: int):
        """The segment's ONNX file as a strongly typed network (and its parser); errors name the aten op to keep."""
        log, name = logger(self.library), segment["name"]
        onnx_path = convert_dir / segment["onnx"]
        network = builder.create_network(self._network_flags(trt))
        parser = trt.OnnxParser(network, log)
        if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
            errors = parser_errors(parser, onnx_node_origins(onnx_path))
            first = errors[0] if errors else {"op_type": None, "node": None, "aten_op": None,
                                              "error": (log.errors_since(mark) or ["unknown error"])[0]}
            keep = first["aten_op"] or "the aten op it comes from (partition/report.json lists them)"
            raise CompileError(
                f"{LIBRARIES[self.library]} {trt.__version__} cannot parse segment {name}: ONNX op {first['op_type']} "
                f"(node {first['node']}, from {first['aten_op'] or 'an unknown aten op'}) failed: {first['error']}",
                f"add {keep} to compile.torch_executed_ops to keep it in PyTorch, or use target=onnxruntime.")
        if network.num_inputs != len(segment["inputs"]):
            raise ArtifactError(f"{onnx_path.name} has {network.num_inputs} inputs but segment {name} lists "
                                f"{len(segment['inputs'])}.", "run the pipeline again to rebuild the convert output.")
        return network, parser

    @staticmethod
    def _add_profiles(builder, network, config, segment: dict[str, Any]) -> None:
        """One optimization profile per input-spec profile: the segment's own shapes at min/opt/max."""
        static = [{c: [spec["shape"] for spec in segment["inputs"]] for c in ("min", "opt", "max")}]
        for corners in segment.get("profiles") or static:
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                profile.set_shape(network.get_input(i).name, *(tuple(corners[c][i]) for c in ("min", "opt", "max")))
            config.add_optimization_profile(profile)

    def _build_plan(self, trt, builder, network, config, name: str, mark: int):
        timing_cache = self._set_timing_cache(config)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            why = (logger(self.library).errors_since(mark) or ["no error was logged"])[0]
            raise CompileError(f"{LIBRARIES[self.library]} {trt.__version__} could not build segment {name}: {why}",
                               "keep the failing ops in PyTorch with compile.torch_executed_ops, "
                               "or change compile.optimization_level / compile.workspace_size.")
        if timing_cache is not None:
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = timing_cache.with_name(f".{timing_cache.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
            os.replace(tmp, timing_cache)  # concurrent jobs each leave a whole cache
        return plan

    def _describe(self, trt, network, mark: int) -> dict[str, Any]:
        """The network as built: each layer's type, precision and tensors (network.json)."""
        described = []
        for layer in (network.get_layer(i) for i in range(network.num_layers)):
            inputs = [tensor_info(layer.get_input(j)) for j in range(layer.num_inputs)]
            outputs = [tensor_info(layer.get_output(j)) for j in range(layer.num_outputs)]
            # Strongly typed: a layer computes in its output type (older TensorRT can say otherwise).
            precision = outputs[0]["dtype"] if outputs else None
            if getattr(layer, "precision_is_set", False):
                precision = tensorrt_name(layer.precision)
            described.append({"name": layer.name, "type": str(layer.type), "precision": precision,
                              "inputs": inputs, "outputs": outputs})
        return {
            "library": self.library, "library_version": trt.__version__,
            "strongly_typed": self._strongly_typed(trt, network),
            "inputs": [tensor_info(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
            "layers": described,
            "warnings": [m for s, m in logger(self.library).messages[mark:] if s == "WARNING"],
        }

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

    def load_engine(self, segment: dict[str, Any], build_dir: Path, options: dict[str, Any]):
        library = segment.get("library", self.library)
        reason = self.can_execute(library)
        if reason:
            raise TargetUnavailable(f"the {library} engine of segment {segment['name']} cannot run here: {reason}.",
                                    "run it on a GPU the engine supports, or rebuild with target=onnxruntime.")
        return TensorRTEngine(build_dir / segment["engine"], library,
                              segment.get("input_names", []), segment.get("output_names", []))


TARGET = TensorRTTarget
