"""Export: the model, cast to the requested precision, through torch.export."""

from __future__ import annotations

from pipeline import programs
from pipeline.errors import ConfigError
from pipeline.models import build_model, sample_inputs, weights_digest
from pipeline.stage import Metrics, StageContext
from pipeline.store import write_json

NAME = "export"
VERSION = 1
INPUTS: tuple[str, ...] = ()
READS = ("model", "input", "compile.precision")

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def cast_inputs(args: tuple, precision: str) -> tuple:
    """Floating inputs follow the model's precision; integer inputs (token ids) never do."""
    import torch

    dtype = getattr(torch, PRECISION_DTYPES[precision])
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


def run(ctx: StageContext) -> Metrics:
    import torch

    cfg = ctx.config
    precision = cfg.compile.precision
    model = build_model(cfg.model)
    digest = weights_digest(model)
    model = model.to(getattr(torch, PRECISION_DTYPES[precision]))
    args = cast_inputs(sample_inputs(cfg.input, 1)[0], precision)
    shape = list(args[0].shape)
    try:
        with torch.no_grad():
            model(*args)
    except Exception as err:  # the model's own complaint is the most useful message
        raise ConfigError(
            f"input {cfg.input.name} of shape {shape} ({cfg.input.dtype}) does not fit model "
            f"{cfg.model.name}: {str(err).splitlines()[0]}",
            "set input.shape (without the batch dimension) and input.dtype to what the model takes, "
            "e.g. input.shape=[3,224,224].",
        ) from None
    with ctx.console.status(f"torch.export of {cfg.model.name}"):
        program = torch.export.export(model, args, strict=False)
    factory_module = cfg.model._target_.rpartition(".")[0]
    programs.save(program, ctx.out, imports=[factory_module])
    torch.save(args, ctx.out / "example_inputs.pt")
    outputs = program.module()(*args)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    write_json(ctx.out / "model.json", {
        "name": cfg.model.name,
        "factory": cfg.model._target_,
        "weights_sha256": digest,
        "precision": precision,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "inputs": [{"name": cfg.input.name, "shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")}
                   for a in args],
        "outputs": [{"shape": list(o.shape), "dtype": str(o.dtype).removeprefix("torch.")} for o in outputs],
    })
    return {"num_parameters": sum(p.numel() for p in model.parameters()),
            "program_bytes": (ctx.out / programs.PROGRAM).stat().st_size}
