"""Batches a user supplies (a factory's, a file's), checked against the input spec.

Calibration (pipeline.calibration) and real data (pipeline.data) both take inputs from
user code and files; both need one reading of "a tensor, a tuple in input order or a dict
by input name" and one error line when it does not fit. They share this module, below both.
"""

from __future__ import annotations

import importlib
import itertools
from typing import Any

from pipeline import shapes
from pipeline.dtypes import torch_dtype
from pipeline.errors import ConfigError, typed_line


def call_factory(group: str, target: str | None, kwargs: dict[str, Any], limit: int | None, fix: str) -> list:
    """The first `limit` items (all: None) of the iterable a user's `<group>._target_` returns, or one line."""
    if not target:
        raise ConfigError(f"{group}.source=factory but {group}._target_ is not set.", fix)
    module_name, _, attr = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        return list(itertools.islice(iter(factory(**kwargs)), limit))
    except Exception as err:  # the user's code: any failure means the same thing
        raise ConfigError(f"{group} factory {target} failed: {typed_line(err)}.", fix) from None


def to_sample(obj, input_cfg, where: str) -> shapes.Sample:
    """A batch (tensor or array, tuple/list in input order, dict by input name) as a Sample of the spec."""
    specs = list(input_cfg.tensors)
    names = [s.name for s in specs]
    if isinstance(obj, dict):
        missing = [n for n in names if n not in obj]
        if missing:
            raise ConfigError(f"{where} has no input {missing[0]!r} (it has {', '.join(map(str, obj)) or 'nothing'}).",
                              f"give every input of input.tensors by name: {', '.join(names)}.")
        values = [obj[n] for n in names]
    else:
        values = list(obj) if isinstance(obj, (tuple, list)) else [obj]
        if len(values) != len(specs):
            raise ConfigError(f"{where} holds {len(values)} tensor(s) but the model takes {len(specs)} "
                              f"({', '.join(names)}).", "give one tensor per input, or a dict by input name.")
    dims: dict[str, int] = {}
    tensors = [_tensor(v, spec, input_cfg, dims, where) for v, spec in zip(values, specs, strict=True)]
    args = tuple(t for t, s in zip(tensors, specs, strict=True) if not s.keyword)
    kwargs = {s.name: t for t, s in zip(tensors, specs, strict=True) if s.keyword}
    return shapes.Sample(args, kwargs, dims)


def _tensor(value, spec, input_cfg, dims: dict[str, int], where: str):
    """One input's tensor in the spec's dtype; its shape fits the spec (dynamic sizes within min..max)."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"{where}: input {spec.name} is a {type(value).__name__}, not a tensor or array.",
                          "give tensors (torch) or arrays (numpy).")
    dtype = torch_dtype(spec.dtype)
    if value.is_floating_point() != dtype.is_floating_point:
        raise ConfigError(f"{where}: input {spec.name} is {str(value.dtype).removeprefix('torch.')}, "
                          f"but input.tensors says {spec.dtype}.", f"give {spec.name} as {spec.dtype}.")
    shape = list(value.shape)
    wrong = len(shape) != len(spec.shape)
    for size, want in zip(shape, spec.shape, strict=False):
        if isinstance(want, str):
            dim = input_cfg.dims[want]
            wrong = wrong or not int(dim["min"]) <= size <= int(dim["max"]) or dims.setdefault(want, size) != size
        else:
            wrong = wrong or size != int(want)
    if wrong:
        raise ConfigError(f"{where}: input {spec.name} has shape {shape}, which does not fit input.tensors "
                          f"({list(spec.shape)}, dims {dict(input_cfg.dims) or 'static'}).",
                          "save calibration batches in the model's input shape (a batch per file).")
    return value.to(dtype).contiguous()
