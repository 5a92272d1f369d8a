"""Typed configuration schema, registered in Hydra's ConfigStore.

The dataclasses are the single definition of every setting: YAML files under conf/
hold only deltas, and a misspelled key or a wrong type fails when Hydra composes the
config, before any heavy work. Fields are plain values (str, int, float, bool, lists,
enums); stages turn them into torch / ONNX Runtime / TensorRT objects themselves.
Each target's schema lives in its own module (pipeline/targets/<name>.py) and is
registered here under `schema_<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Precision(str, Enum):
    """Precision the model is cast to before export (strongly typed engines follow it).

    int8 keeps the model in fp32 through export and convert; build quantizes each segment
    with the target's own tool, calibrated with the `calibration` group's data.
    """

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    # Calibrated like int8, as an FP8 (E4M3) QDQ graph: target=tensorrt only (compute capability >= 8.9).
    fp8 = "fp8"


class CalibrationSource(str, Enum):
    """Where int8 calibration batches come from (pipeline.calibration)."""

    random = "random"
    folder = "folder"
    factory = "factory"
    # The `data` group's calibration split (disjoint from its validation split).
    data = "data"


class DataSource(str, Enum):
    """Real data (pipeline.data): none, an ImageFolder of images, tensors in files, or a factory."""

    none = "none"
    images = "images"
    tensors = "tensors"
    factory = "factory"


class CalibrationMethod(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class QuantizeMode(str, Enum):
    """static: activation scales from calibration, fixed in the graph. dynamic: computed per batch
    at run time (ONNX Runtime's recommendation for transformers; weights are int8 either way)."""

    static = "static"
    dynamic = "dynamic"
    # int8 weights, float activations and compute (target=inductor on CUDA: torchao's Int8WeightOnlyConfig).
    weight_only = "weight_only"


@dataclass
class ModelConfig:
    """Any importable factory returning an nn.Module; torchvision models by default."""

    name: str = MISSING
    _target_: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)
    # None builds random weights (no download); e.g. "DEFAULT" asks torchvision for pretrained ones.
    weights: str | None = None
    # Filled in before any stage for a local weights file (.safetensors/.pt/.pth): its sha256.
    weights_sha256: str | None = None
    # Seed for random weights, so every build of the same config has the same model.
    seed: int = 0
    # "classification" enables top-1 agreement in validation.
    task: str = "classification"


@dataclass
class TensorSpec:
    """One model input, by name, as torch_tensorrt.Input describes it."""

    name: str = "x"
    # Each size is an int (static) or the name of a dimension in input.dims (dynamic; inputs
    # naming the same dimension share it, e.g. batch and sequence).
    shape: list[Any] = field(default_factory=lambda: [1, 3, 224, 224])
    dtype: str = "float32"
    # Integer inputs draw values from [low, high): token ids up to the vocabulary, masks 1..2 (all ones).
    low: int = 0
    high: int = 2
    # Passed as forward(name=...) instead of by position.
    keyword: bool = False


@dataclass
class InputConfig:
    """The model's inputs: static shapes, or dynamic dimensions with min/opt/max."""

    name: str = "image_224"
    tensors: list[TensorSpec] = field(default_factory=lambda: [TensorSpec()])
    # name -> {min, opt, max} (checked by pipeline.shapes); add one with +input.dims.batch={min:1,opt:8,max:32}.
    dims: dict[str, Any] = field(default_factory=dict)
    # More TensorRT optimization profiles, each giving min/opt/max for some dims (the others keep
    # input.dims); the first profile is always input.dims.
    extra_profiles: list[dict[str, Any]] = field(default_factory=list)
    # Seed of the sample data used for export, validation and latency.
    seed: int = 0


@dataclass
class CompileConfig:
    """Settings named as in Torch-TensorRT so users can carry them across."""

    min_block_size: int = 5
    # Post-decomposition op names, e.g. aten.relu.default (or aten.relu for every overload).
    torch_executed_ops: list[str] = field(default_factory=list)
    require_full_compilation: bool = False
    precision: Precision = Precision.fp32
    # TensorRT builder optimization level 0..5 (ignored by targets without one).
    optimization_level: int = 3
    # Builder workspace in bytes; 0 leaves the library default.
    workspace_size: int = 0
    truncate_long_and_double: bool = False


@dataclass
class CalibrationConfig:
    """Data that sets int8 ranges (compile.precision=int8); hashed by content into the build key."""

    source: CalibrationSource = CalibrationSource.random
    # source=folder: .npy/.pt files, one batch each (a tensor, or a dict by input name), read in name order.
    folder: str | None = None
    # source=factory: an importable callable returning an iterable of batches (tensor, tuple or dict).
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Batches used; fewer available is an error, more are ignored.
    num_samples: int = 16
    method: CalibrationMethod = CalibrationMethod.minmax
    # Per-output-channel weight scales (what TensorRT and ORT's CPU kernels expect for convolutions).
    per_channel: bool = True
    # Random source: seed of the generated batches (different from validation's inputs).
    seed: int = 1234
    # Filled in by the pipeline before any stage: sha256 of the batches, so the build key follows content.
    digest: str | None = None


@dataclass
class DataConfig:
    """Real inputs with labels where they exist (pipeline.data): task metrics and calibration=data."""

    name: str = "none"
    source: DataSource = DataSource.none
    # images: an ImageFolder root; tensors: a .npy/.pt file of samples [N, ...].
    path: str | None = None
    # tensors: a .npy/.pt file of integer labels [N] (null: no labels).
    labels: str | None = None
    # source=factory: an importable callable returning an iterable of (inputs, label) or inputs.
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # images: resize_crop_normalize (shorter side to `resize`, centre crop to the input size) or resize_normalize.
    transform: str = "resize_crop_normalize"
    resize: int | None = None
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # After a seeded shuffle the first calibration_items items are the calibration split, the rest
    # (at most validation_items) the validation split: disjoint by construction.
    calibration_items: int = 64
    validation_items: int | None = None
    shuffle_seed: int = 0
    # auto: top-1/top-5 for classifiers with labels, per-sample cosine otherwise; or a function by
    # dotted path, called with (outputs, labels) and returning {name: value} (higher is better).
    metric: str = "auto"
    # Filled in before any stage: sha256 of both splits, so validate's key follows content.
    digest: str | None = None


@dataclass
class QuantizeConfig:
    """The accuracy-aware loop: layers kept in fp32 when the int8 build fails validate.tolerances.int8."""

    # static | dynamic activation scales (dynamic: target=onnxruntime's quantize_dynamic, no calibrated ranges;
    # the calibration batches still check each round's accuracy).
    mode: QuantizeMode = QuantizeMode.static
    # Rebuilds after the first int8 build; 0 disables the loop (the gate then only fails in validate).
    max_rounds: int = 3
    # Worst layers (by quantization SQNR) moved to fp32 in each round.
    layers_per_round: int = 2
    # SmoothQuant's alpha (pipeline.quantize.smooth, ONNX models): when round 0 fails, the next round
    # smooths activation outliers into the weights before any layer is kept in fp32. None: never.
    smooth_alpha: float | None = None
    # Calibration batches the loop checks accuracy on (against fp32 eager).
    eval_samples: int = 8
    # Layers (ONNX node names) always kept in fp32.
    exclude: list[str] = field(default_factory=list)
    # ONNX op types to quantize; empty: the quantizer's default (ORT: Conv, MatMul, Add, Mul, Relu, ...).
    # Transformers do better with [MatMul, Gemm] (quantize=transformer): fewer requantized sums.
    op_types: list[str] = field(default_factory=list)
    # Iterations timing each round's program (0: no per-round latency).
    latency_iterations: int = 20
    # Fail the job when the int8/fp8 engine is not faster than the same target's engine at the
    # precision it replaces (fp32 on the CPU, fp16 on a GPU), timed interleaved in one process.
    require_speedup: bool = False


@dataclass
class Tolerance:
    """Accuracy gates against eager PyTorch; None disables a gate."""

    max_abs_err: float | None = None
    rel_l2_err: float | None = 1e-3
    min_cosine_similarity: float | None = 0.9999
    min_top1_agreement: float | None = None


def _default_tolerances() -> dict[str, Tolerance]:
    return {
        "fp32": Tolerance(rel_l2_err=1e-3, min_cosine_similarity=0.9999),
        "fp16": Tolerance(rel_l2_err=1e-2, min_cosine_similarity=0.999),
        "bf16": Tolerance(rel_l2_err=5e-2, min_cosine_similarity=0.99),
        # Calibrated int8 (QDQ, per-channel) of a CNN lands near cosine 0.9998; a broken layer far below.
        "int8": Tolerance(rel_l2_err=5e-2, min_cosine_similarity=0.999, min_top1_agreement=0.9),
        # FP8 E4M3 keeps 3 mantissa bits: per-tensor scales cost more than int8's on CNNs.
        "fp8": Tolerance(rel_l2_err=1e-1, min_cosine_similarity=0.995, min_top1_agreement=0.9),
    }


@dataclass
class ThroughputConfig:
    """Model Navigator's max-throughput-with-budget: batches timed upwards until p99 passes the budget."""

    enabled: bool = False
    # p99 host latency (enqueue and wait) a batch may take to be chosen, ms.
    p99_budget_ms: float = 10.0
    # Batches to time; empty: powers of two from the batch dim's min up to its max, and the max.
    batches: list[int] = field(default_factory=list)
    # Calls timed per batch (in `rounds` rounds, as validate times).
    iterations: int = 200


@dataclass
class ValidateConfig:
    # Seeded input batches compared against eager PyTorch at the opt shape.
    num_samples: int = 8
    # Dynamic inputs: batches checked at the min and max shapes and at each random shape between.
    corner_samples: int = 2
    random_shapes: int = 2
    # Dynamic inputs: latency also at the min and max shapes (always at opt).
    latency_at_corners: bool = False
    warmup: int = 10
    # Timed iterations per target, split into `rounds` interleaved blocks (eager, compiled, ...)
    # so drift of clocks or load affects both alike.
    iterations: int = 100
    rounds: int = 5
    # Keep timing until at least this many seconds have passed per target (trtexec --duration).
    min_seconds: float = 0.0
    # CPU threads of eager PyTorch and of the engines alike while timed (torch.set_num_threads,
    # ONNX Runtime's intra_op_num_threads). 0: the physical cores this process may use, less those
    # busy with other work when validate starts (pipeline.timing.thread_budget).
    threads: int = 0
    # On a GPU, time at least this many calls (a p99 read from >= 10 calls above it).
    gpu_iterations: int = 1000
    # Latency is trusted when the rounds' medians lie within this fraction of their median
    # ((max - min) / median); above it the figures are flagged (latency.trusted=false).
    spread_warn_threshold: float = 0.05
    tolerances: dict[str, Tolerance] = field(default_factory=_default_tolerances)
    # Re-use a previous validation of the same build instead of measuring again.
    cache: bool = False
    # On a GPU: time the compiled module replayed from a CUDA graph (trtexec --useCudaGraph).
    cuda_graph: bool = False
    # The batch with the most throughput under a p99 latency budget (pipeline/throughput.py).
    throughput: ThroughputConfig = field(default_factory=lambda: ThroughputConfig())
    # Largest allowed drop of the task metric against eager fp32 on the data's validation split, in
    # points (top-1 in percent; per-sample cosine x 100); None: reported, not gated.
    max_drop: float | None = None


@dataclass
class PathsConfig:
    # Everything the pipeline writes lives under here (git-ignored).
    outputs: str = "outputs"
    cache: str = "${paths.outputs}/cache"


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Used when MLFLOW_EXPERIMENT_NAME is not set.
    experiment: str = "pipeline"
    # Default store when MLFLOW_TRACKING_URI is not set.
    store: str = "${paths.outputs}/mlflow.db"
    artifacts: str = "${paths.outputs}/mlartifacts"
    log_artifacts: bool = True
    # Engine files are uploaded once per build key; false uploads none (reports and configs still go).
    log_engines: bool = True


@dataclass
class Config:
    model: ModelConfig = MISSING
    input: InputConfig = MISSING
    compile: CompileConfig = MISSING
    target: Any = MISSING
    validate: ValidateConfig = MISSING
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Show full tracebacks for user-facing errors too.
    verbose: bool = False
    # Register the compiled program in MLflow's model registry (a new version of the model's name).
    register: bool = False
    # Estimate the host and GPU memory the job needs before any stage and refuse it if it cannot fit.
    check_memory: bool = True
    # The GPUs (CUDA indices) this node's CUDA jobs share, one job a GPU at a time (pipeline.gpu_lease);
    # None: CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists.
    gpus: list[int] | None = None


def register() -> None:
    """Register the schemas; YAML files pick them up through their defaults lists."""
    from pipeline import targets

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, schema in targets.schemas().items():  # each target module holds its own schema
        cs.store(group="target", name=f"schema_{name}", node=schema)


def check_known_keys(container: dict[str, Any]) -> None:
    """Reject keys the schema lacks: Hydra lets `+key=value` past the schema check."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from pipeline import targets
    from pipeline.errors import ConfigError, first_line

    target = container["target"]
    schema = targets.schemas().get(target.get("name"))
    try:
        OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in container.items() if k != "target"})
        if schema is not None:
            OmegaConf.merge(OmegaConf.structured(schema), target)
    except ConfigKeyError as err:
        raise ConfigError(f"unknown setting: {first_line(err)}.",
                          "check the spelling against `python -m pipeline --cfg job`; "
                          "'+' only adds keys that the schema allows (e.g. model.kwargs).") from None


register()
