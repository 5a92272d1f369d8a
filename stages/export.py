"""Export: the model, cast to the requested precision, through torch.export.

It traces on the device the engines run on (Target.trace_device): torch.export bakes
devices into the graph, so a program traced on the CPU would not run on the GPU. The
samples are saved on the CPU; every later stage moves them where it needs them.

Dynamic dimensions of the input spec become torch.export Dims, traced at the opt sizes;
the model runs eagerly at every corner first, so a shape it rejects fails in one line
before anything is built, and a dimension the model specialises is named.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pipeline import calibration, layout, programs, shapes
from pipeline.dtypes import name_of, torch_dtype
from pipeline.errors import ConfigError, first_line
from pipeline.files import write_json
from pipeline.models import build_model, cast_model, caster, flat_outputs, weights_digest
from pipeline.stage import INPUT_KEYS, MODEL_KEYS, Metrics, StageContext, StageSpec
from pipeline.targets import PLACING

FILES = layout.EXPORT

def _describe(sample: shapes.Sample) -> str:
    tensors = [*sample.args, *sample.kwargs.values()]
    return ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors)


def _probe(model, sample: shapes.Sample, cfg, where: str) -> list:
    """Eager outputs at these sizes: a shape the model rejects fails here, in one line.

    A model whose output holds no tensor (a forward that returns None, or only numbers)
    has nothing to compile or compare: torch.export would trace a program of no ops and
    every later stage would build and cache it, so it is refused here.
    """
    import torch

    try:
        with torch.no_grad():
            out = sample(model)
    except Exception as err:  # the model's own complaint is the most useful message
        raise ConfigError(
            f"input {cfg.input.name} at {where} ({_describe(sample)}) does not fit model "
            f"{cfg.model.name}: {(str(err).splitlines() or [type(err).__name__])[0]}",
            "set input.tensors (shapes, dtypes, keyword) and input.dims to what the model takes, "
            "e.g. input=image_224 or input=text_dynamic.",
        ) from None
    outputs = flat_outputs(out)
    if not outputs:
        raise ConfigError(
            f"model {cfg.model.name} returned {type(out).__name__} at {where}, which holds no tensor: "
            "there is nothing to compile or to compare.",
            f"make {cfg.model._target_}'s forward return a tensor (or a tuple, list or dict of tensors).",
        )
    return outputs


def _export(model, sample: shapes.Sample, cfg):
    import contextlib

    import torch
    from torch.fx.experimental import _config as fx_config

    dynamic = shapes.dynamic_shapes(model, cfg.input, sample)
    # Size-oblivious tracing (as torch.onnx does) keeps a dimension dynamic even when opt is 1.
    oblivious = fx_config.patch(backed_size_oblivious=True) if dynamic else contextlib.nullcontext()
    try:
        with oblivious:
            return torch.export.export(model, sample.args, kwargs=sample.kwargs, dynamic_shapes=dynamic,
                                       strict=False)
    except Exception as err:
        text = str(err)
        if dynamic and ("Constraints violated" in text or "specializ" in text or "Dim" in type(err).__name__
                        or "ConstraintViolation" in type(err).__name__):
            detail = next((line.strip() for line in text.splitlines() if "specializ" in line or "must" in line),
                          text.splitlines()[0])
            raise _not_dynamic(cfg, detail) from None
        raise


# Where transformers' BERT encoders (conf/model/bert_*.yaml, input=text_dynamic) were seen to keep
# batch and seq dynamic. torch 2.11 traced on the CPU (SDPA) guards batch != 1, which min 1 violates.
TESTED_DYNAMIC = ("transformers encoders keep batch and seq dynamic with torch 2.14 + transformers 5.17 or "
                  "5.24 (CPU), and torch 2.11 + transformers 5.17 on CUDA")


def _not_dynamic(cfg, detail: str) -> ConfigError:
    import sys

    import torch

    here = [f"torch {torch.__version__}"]
    if "transformers" in sys.modules:
        here.append(f"transformers {sys.modules['transformers'].__version__}")
    return ConfigError(
        f"model {cfg.model.name} does not keep input dimension(s) {', '.join(cfg.input.dims)} dynamic "
        f"({', '.join(here)}): {detail}",
        "make that dimension static in input.tensors (a number instead of its name), or narrow its "
        f"min/max in input.dims to sizes the model treats alike ({TESTED_DYNAMIC}).",
    )


def _check_corners(program, eager: dict[str, list], examples: dict[str, shapes.Sample], cfg) -> None:
    """The traced program must agree with eager at every corner, not only where it was traced.

    torch.export assumes dynamic sizes are not 0 or 1 while tracing, so a model that
    branches on `batch == 1` exports without complaint and is wrong at batch 1; one
    eager/exported comparison per corner catches it here, before anything is built.
    """
    import torch

    module = program.module()
    for name, sample in examples.items():
        if name == "opt":
            continue
        ref = eager[name]
        try:
            with torch.no_grad():
                got = flat_outputs(sample(module))
            bad = next((f"output {i} differs from eager" for i, (g, r) in enumerate(zip(got, ref, strict=True))
                        if g.shape != r.shape or not torch.allclose(g.double(), r.double(), rtol=1e-2, atol=1e-3)),
                       None)
        except Exception as err:  # guard failures and shape errors of the traced program
            bad = first_line(err)
        if bad:
            raise _not_dynamic(cfg, f"the exported program, traced at opt, is wrong at "
                                    f"{name} ({shapes.label(sample.dims)}): {bad}")


def corner_samples(input_cfg, cast) -> dict[str, shapes.Sample]:
    """One sample at opt; for dynamic inputs also at min and max of every profile."""
    samples = {"opt": shapes.make(input_cfg, shapes.corners(input_cfg)["opt"], 1)[0].to("cpu", cast)}
    if shapes.is_dynamic(input_cfg):
        for p, profile in enumerate(shapes.profiles(input_cfg)):
            for corner in ("min", "max") if p == 0 else shapes.CORNERS:
                name = corner if p == 0 else f"p{p}-{corner}"
                samples[name] = shapes.make(input_cfg, profile[corner], 1)[0].to("cpu", cast)
    return samples


def _quantize(ctx: StageContext, model, device: str, cast) -> tuple[Any, dict[str, Any]]:
    """The model fake-quantized by the target (Target.quantizes_module), calibrated with the job's batches."""
    cfg, precision = ctx.config, ctx.config.compile.precision
    loaded, digest = calibration.load_checked(cfg.calibration, cfg.input, cfg.data)
    batches = [b.to(device, cast) for b in loaded]
    exclude = list(cfg.quantize.exclude)
    with ctx.console.status(f"{precision}: calibrating {cfg.model.name} on {len(batches)} batches for "
                            f"{ctx.target.name}"):
        model, record = ctx.target.quantize_module(model, batches, precision, exclude)
    return model, {"precision": precision, "num_batches": len(batches), "excluded": exclude,
                   "calibration_sha256": digest, **record}


def run(ctx: StageContext) -> Metrics:
    cfg = ctx.config  # the input spec was checked by the runner before any stage
    precision = cfg.compile.precision
    model = build_model(cfg.model)
    digest = weights_digest(model)
    device = ctx.target.trace_device()
    model = cast_model(model, precision).to(device)
    cast = caster(precision)
    quantized, context = None, contextlib.nullcontext()
    if ctx.quantization == "module":  # e.g. Torch-TensorRT's modelopt route
        model, quantized = _quantize(ctx, model, device, cast)
        context = ctx.target.export_context()
    examples = corner_samples(cfg.input, cast)
    placed = {name: sample.to(device) for name, sample in examples.items()}
    eager = {name: _probe(model, sample, cfg, f"{name} ({shapes.label(sample.dims)})")
             for name, sample in placed.items()}
    with ctx.console.status(f"torch.export of {cfg.model.name} on {device}"), context:
        program = _export(model, placed["opt"], cfg)
        _check_corners(program, eager, placed, cfg)
    # The factory's module (for custom ops) and the modules of the output types, for any later process.
    factory_module = cfg.model._target_.rpartition(".")[0]
    programs.save(program, ctx.out, imports=programs.needed_imports(program, factory_module))
    shapes.save_samples(examples, ctx.out / FILES.example)
    num_parameters = sum(p.numel() for p in model.parameters())
    write_json(ctx.out / FILES.model, {
        "factory": cfg.model._target_,
        "weights_sha256": digest,
        "precision": precision,
        "num_parameters": num_parameters,
        "inputs": [{"name": t.name, "shape": list(t.shape), "keyword": bool(t.keyword),
                    "dtype": name_of(cast(torch_empty(torch_dtype(t.dtype))).dtype)} for t in cfg.input.tensors],
        "dims": {name: dict(d) for name, d in cfg.input.dims.items()},
        "outputs": [{"shape": list(o.shape), "dtype": name_of(o.dtype)} for o in eager["opt"]],
        **({"quantized_module": quantized} if quantized else {}),
    })
    return {"num_parameters": num_parameters, "program_bytes": (ctx.out / FILES.program).stat().st_size}


def torch_empty(dtype):
    import torch

    return torch.empty(0, dtype=dtype)


# model.name and model.task are labels: renaming a model changes no exported byte.
# It asks the target only where its engines run (PLACING), so targets of one device share it.
SPEC = StageSpec(
    name="export", version=4, run=run,
    reads=(*MODEL_KEYS, *INPUT_KEYS, "compile.precision"),
    labels=("model.name", "input.name"), asks=PLACING,
    libraries=("torch", "torchvision", "transformers"),
    writes=FILES,
)
