"""The shapes a compiled program takes, checked before a call reaches its engines.

An engine is built for the input spec of its run: static sizes, or a min..max range per
dynamic dimension. Outside them the engines fail deep inside (an exported program's
`Guard failed: input.size()[0] == 1`, ONNX Runtime's index errors), which tells a caller
nothing. `pipeline.load` and the served MLflow model check the call against export's
model.json first and refuse it in one sentence: the shape given and the shapes taken.
The same spec gives the MLflow signature its exact static sizes and -1 for dynamic ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


class InputShapeError(PipelineError, ValueError):
    """A call with inputs the engines were not built for."""


@dataclass(frozen=True)
class TensorTakes:
    name: str
    dtype: str
    keyword: bool
    # Per axis: an int (static) or (dim name, min, max).
    axes: tuple[int | tuple[str, int, int], ...]

    def text(self) -> str:
        sizes = [str(a) if isinstance(a, int) else f"{a[0]} in {a[1]}..{a[2]}" for a in self.axes]
        return f"({', '.join(sizes)})"

    def mlflow_shape(self) -> tuple[int, ...]:
        return tuple(a if isinstance(a, int) else -1 for a in self.axes)

    def problem(self, shape: tuple[int, ...], sizes: dict[str, int]) -> str | None:
        """Why `shape` does not fit (None if it does); `sizes` carries dynamic dims between inputs."""
        if len(shape) != len(self.axes):
            return f"has {len(shape)} dimensions, the engine takes {len(self.axes)}"
        for axis, (got, want) in enumerate(zip(shape, self.axes, strict=True)):
            if isinstance(want, int):
                if got != want:
                    return f"has size {got} on axis {axis}, the engine was built for {want}"
                continue
            name, low, high = want
            if not low <= got <= high:
                return f"has {name}={got} on axis {axis}, the engine takes {name} in {low}..{high}"
            if sizes.setdefault(name, got) != got:
                return f"has {name}={got} on axis {axis}, another input has {name}={sizes[name]}"
        return None


def read_spec(model_json: dict[str, Any], extra_profiles: list[dict[str, Any]] | None = None) -> list[TensorTakes]:
    """What export's model.json says the program takes; extra TensorRT profiles widen the ranges."""
    ranges = {name: [int(d["min"]), int(d["max"])] for name, d in (model_json.get("dims") or {}).items()}
    for profile in extra_profiles or []:
        for name, dim in profile.items():
            if name in ranges:
                ranges[name] = [min(ranges[name][0], int(dim["min"])), max(ranges[name][1], int(dim["max"]))]
    out = []
    for spec in model_json["inputs"]:
        axes = tuple(int(s) if not isinstance(s, str) else (s, *ranges[s]) for s in spec["shape"])
        out.append(TensorTakes(spec["name"], spec["dtype"], bool(spec.get("keyword")), axes))
    return out


def spec_of_run(run_dir: Path) -> list[TensorTakes]:
    """The spec of a run folder: export/model.json, widened by config.yaml's input.extra_profiles."""
    from omegaconf import OmegaConf  # YAML only: loading a config runs no code

    from pipeline import layout
    from pipeline.files import load_json

    model_json = load_json(run_dir / "export" / layout.EXPORT.model, "the exported model's description")
    extra = None
    config_file = run_dir / layout.RUN_CONFIG
    if config_file.is_file():
        config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        extra = ((config.get("input") or {}).get("extra_profiles")) if isinstance(config, dict) else None
    return read_spec(model_json, extra if isinstance(extra, list) else None)


def takes_text(spec: list[TensorTakes]) -> str:
    return ", ".join(f"{t.name} {t.text()}" for t in spec)


def check(spec: list[TensorTakes], args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse a call whose tensors do not fit `spec`, in one sentence naming both shapes."""
    given = dict(zip((t.name for t in spec if not t.keyword), args, strict=False))
    given.update(kwargs)
    sizes: dict[str, int] = {}
    for takes in spec:
        value = given.get(takes.name)
        shape = tuple(getattr(value, "shape", ()) or ())
        if value is None or not hasattr(value, "shape"):
            problem = "is missing" if value is None else f"is a {type(value).__name__}, not a tensor"
        else:
            problem = takes.problem(shape, sizes)
        if problem:
            got = f" of shape {tuple(shape)}" if hasattr(value, "shape") else ""
            raise InputShapeError(f"input {takes.name}{got} {problem}: this engine takes {takes_text(spec)}.",
                                  "pass inputs of those shapes, or build an engine for these "
                                  "(input.tensors / input.dims).")


def guard(module, spec: list[TensorTakes]):
    """`module` with a pre-call check of its inputs (a few microseconds: shape compares only)."""
    def pre_hook(_module, args, kwargs):
        check(spec, args, kwargs)

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return module
