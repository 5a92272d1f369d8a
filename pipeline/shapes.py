"""Input specs: checked before any heavy work, turned into sample batches and export's dynamic dims.

An input spec names each tensor with its dtype and shape; a size is an int or the name of
a dynamic dimension in `input.dims` with min/opt/max (inputs naming the same dimension
share it, as batch and sequence do for token ids and attention masks). Everything shape
related reads these helpers, so export, the TensorRT profiles and validation's corner
checks agree on what min, opt and max are.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from dataclasses import dataclass
from typing import Any

from pipeline.dtypes import FLOAT_INPUT_DTYPES, input_dtype, torch_dtype
from pipeline.errors import ArtifactError, ConfigError, first_line

CORNERS = ("min", "opt", "max")


@dataclass
class Sample:
    """One batch of inputs: positional and keyword tensors, at the sizes `dims`."""

    args: tuple
    kwargs: dict[str, Any]
    dims: dict[str, int]

    def to(self, device: str, cast=None) -> Sample:
        def move(t):
            t = cast(t) if cast else t
            return t.to(device)
        return Sample(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()}, self.dims)

    def __call__(self, module):
        return module(*self.args, **self.kwargs)



def _check_dim(where: str, dim) -> None:
    keys = sorted(dim.keys()) if hasattr(dim, "keys") else None
    if keys != ["max", "min", "opt"] or not all(isinstance(dim[k], int) and not isinstance(dim[k], bool) for k in keys):
        raise ConfigError(f"{where}={dim!r} is not a dynamic dimension.",
                          f"give it integer min, opt and max: {where}={{min: 1, opt: 8, max: 32}}.")
    lo, opt, hi = int(dim["min"]), int(dim["opt"]), int(dim["max"])
    if lo < 1:
        raise ConfigError(f"{where}.min={lo}: sizes start at 1.", f"set {where}.min to 1 or more.")
    if not lo <= opt <= hi:
        rule = "min > opt" if lo > opt else "opt > max"
        raise ConfigError(f"{where} has {rule} (min={lo}, opt={opt}, max={hi}).",
                          f"order them so that {where}.min <= opt <= max.")


def check(input_cfg) -> None:
    """Every rule an input spec must follow, as one-line errors, before anything is built."""
    tensors, dims = list(input_cfg.tensors), dict(input_cfg.dims)
    if not tensors:
        raise ConfigError("input.tensors is empty.", "describe at least one input, e.g. input=image_224.")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ConfigError(f"input.tensors repeats a name: {names}.", "give every input its own name.")
    for name, dim in dims.items():
        _check_dim(f"input.dims.{name}", dim)
    used = set()
    for i, t in enumerate(tensors):
        input_dtype(t.dtype)
        for size in t.shape:
            if isinstance(size, str):
                if size not in dims:
                    raise ConfigError(f"input.tensors[{i}] ({t.name}) names dimension {size!r}, which input.dims lacks.",
                                      f"add input.dims.{size}={{min: 1, opt: 8, max: 32}}, or give a number.")
                used.add(size)
            elif not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(f"input.tensors[{i}] ({t.name}) has size {size!r} in shape {list(t.shape)}.",
                                  "use positive integers, or names of dimensions in input.dims.")
        if input_dtype(t.dtype) not in FLOAT_INPUT_DTYPES and t.low >= t.high:
            raise ConfigError(f"input.tensors[{i}] ({t.name}) draws integers from [{t.low}, {t.high}), which is empty.",
                       f"set input.tensors[{i}].high above low (e.g. the vocabulary size).")
    unused = sorted(set(dims) - used)
    if unused:
        raise ConfigError(f"input.dims.{unused[0]} is not used by any input's shape.",
                          f"name it in a shape (e.g. [{unused[0]}, 3, 224, 224]) or remove it.")
    for p, profile in enumerate(input_cfg.extra_profiles):
        for name, dim in profile.items():
            if name not in dims:
                raise ConfigError(f"input.extra_profiles[{p}] sets {name!r}, which is not in input.dims.",
                                  f"use the dimensions of input.dims: {', '.join(dims) or 'none'}.")
            _check_dim(f"input.extra_profiles[{p}].{name}", dim)


def is_dynamic(input_cfg) -> bool:
    return bool(input_cfg.dims)


def varying_dims(input_cfg) -> list[str]:
    """The names of the dims whose min and max differ: what a CUDA graph, captured per shape, cannot serve.

    Asked when the target settles, before `check` has judged the spec: a malformed dim counts as
    varying here, and `check` then refuses it in one line.
    """
    return [str(n) for n, d in (input_cfg.get("dims") or {}).items()
            if not hasattr(d, "get") or d.get("min") is None or d.get("min") != d.get("max")]


def corners(input_cfg) -> dict[str, dict[str, int]]:
    """The sizes of every dynamic dimension at min, opt and max ({} each for static inputs)."""
    return {c: {name: int(dim[c]) for name, dim in input_cfg.dims.items()} for c in CORNERS}


def profiles(input_cfg) -> list[dict[str, dict[str, int]]]:
    """One entry per TensorRT optimization profile: {min/opt/max: dims}; the first is input.dims."""
    out = [corners(input_cfg)]
    for extra in input_cfg.extra_profiles:
        merged = corners(input_cfg)
        for name, dim in extra.items():
            for c in CORNERS:
                merged[c][name] = int(dim[c])
        out.append(merged)
    return out


def random_dims(input_cfg, count: int, seed: int) -> list[dict[str, int]]:
    """Sizes drawn between min and max, to catch engines that only work at the profile's corners."""
    rng = random.Random(seed)
    return [{name: rng.randint(int(d["min"]), int(d["max"])) for name, d in input_cfg.dims.items()}
            for _ in range(count)]


def label(dims: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in dims.items()) or "static"


def shape_of(spec, dims: dict[str, int]) -> list[int]:
    return [dims[s] if isinstance(s, str) else int(s) for s in spec.shape]


def batch_size(input_cfg, dims: dict[str, int]) -> int:
    """Samples per call, for throughput: the first input's leading size."""
    return shape_of(input_cfg.tensors[0], dims)[0]


def make(input_cfg, dims: dict[str, int], count: int, seed_offset: int = 0) -> list[Sample]:
    """`count` seeded batches at sizes `dims`: normal floats, integers from [low, high)."""
    import torch

    gen = torch.Generator().manual_seed(int(input_cfg.seed) + seed_offset)
    out = []
    for _ in range(count):
        args, kwargs = [], {}
        for spec in input_cfg.tensors:
            dtype, shape = torch_dtype(spec.dtype), shape_of(spec, dims)
            if dtype.is_floating_point:
                value = torch.randn(shape, generator=gen).to(dtype)
            else:
                value = torch.randint(int(spec.low), int(spec.high), shape, generator=gen).to(dtype)
            if spec.keyword:
                kwargs[spec.name] = value
            else:
                args.append(value)
        out.append(Sample(tuple(args), kwargs, dict(dims)))
    return out


def dynamic_shapes(model, input_cfg, sample: Sample) -> dict[str, Any] | None:
    """torch.export's dynamic_shapes for the spec, keyed by the forward's parameter names."""
    if not is_dynamic(input_cfg):
        return None
    import torch

    every = profiles(input_cfg)  # the program must accept the sizes of every profile
    dims = {name: torch.export.Dim(name, min=min(p["min"][name] for p in every), max=max(p["max"][name] for p in every))
            for name in input_cfg.dims}
    bound = inspect.signature(model.forward).bind(*sample.args, **sample.kwargs)
    by_tensor = {}
    positional = iter(s for s in input_cfg.tensors if not s.keyword)
    for param in bound.arguments:
        spec = next((s for s in input_cfg.tensors if s.keyword and s.name == param), None) or next(positional)
        by_tensor[param] = {i: dims[s] for i, s in enumerate(spec.shape) if isinstance(s, str)} or None
    return by_tensor


def save_samples(samples: dict[str, Sample], path) -> None:
    """The samples export traced with, for every later stage and process."""
    import torch

    torch.save({k: {"args": s.args, "kwargs": s.kwargs, "dims": s.dims} for k, s in samples.items()}, path)


def load_samples(path) -> dict[str, Sample]:
    """'opt', and 'min'/'max' (and 'p<i>-<corner>') for dynamic inputs: tensors only, never code."""
    import pickle

    import torch

    try:  # the weights-only unpickler: tensors, containers and numbers, never an arbitrary object
        saved = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ArtifactError(f"{path} holds more than tensors, so it is not loaded ({first_line(err)}).",
                            "rebuild the run with this pipeline; never load samples from unknown sources.") from None
    return {name: Sample(tuple(s["args"]), dict(s["kwargs"]), dict(s["dims"])) for name, s in saved.items()}


def digest(batches: list[Sample]) -> str:
    """sha256 over every tensor's dtype, shape and bytes, in order: the data's identity, not its path."""
    import torch

    h = hashlib.sha256()
    for sample in batches:
        for name, t in [*enumerate(sample.args), *sorted(sample.kwargs.items())]:
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
