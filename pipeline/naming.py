"""What a person reads in MLflow: run names that tell runs apart and params that matter.

A sweep's child is named by what varies in the sweep (`min_block_size=3 onnxruntime`),
the sweep's parent by what it sweeps, a single run by model, target and time. Params
are the settings that change what was built or measured: folders, tracking settings
and the tolerances of precisions not in use are left out, and input specs read as
shapes (`1x3x224x224 float32`), not as Python reprs.
"""

from __future__ import annotations

import re
import time
from typing import Any

# Hydra's sweep functions in an override's value.
SWEEP_FUNCTION = re.compile(r"^(choice|range|interval|tag|glob)\(")
DROPPED_PREFIXES = ("paths.", "tracking.", "hydra.", "resolved.")
DROPPED_KEYS = ("verbose", "check_memory", "gpus")  # gpus: where it ran is in the tags (gpu.*)


def split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def is_sweep(value: str) -> bool:
    """`1,3,5` or `choice(...)`: several values; `[a,b]` (one list value) is not."""
    if SWEEP_FUNCTION.match(value):
        return True
    depth = 0
    for char in value:
        depth += char in "[({"
        depth -= char in "])}"
        if char == "," and depth == 0:
            return True
    return False


def swept_keys(overrides: list[str], search_params: dict[str, Any] | None = None) -> list[str]:
    """Keys a sweep varies: command-line overrides with several values, and an Optuna search's params."""
    keys = [k for k, v in map(split_override, overrides) if is_sweep(v)]
    keys += [k for k in (search_params or {}) if k not in keys]
    return keys


def short(key: str, keys: list[str]) -> str:
    """The last part of a dotted key, unless another swept key ends the same way."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def child_name(job_overrides: str, swept: list[str], target: str) -> str:
    """`3 onnxruntime · min_block_size`: this job's swept values and target first, the keys they belong to after.

    The runs table cuts names at ~25 characters: names that began with the shared key
    (`min_block_size=1 ...`, `min_block_size=3 ...`) all read `min_block_size…` there.
    """
    values = dict(split_override(o) for o in job_overrides.split())
    keys = [k for k in swept if k in values and k not in ("target", "target.name")]
    head = " ".join([*(values[k] for k in keys), target])
    return f"{head} · {', '.join(short(k, swept) for k in keys)}" if keys else head


def sweep_name(overrides: list[str], swept: list[str], search_params: dict[str, Any] | None = None) -> str:
    """`sweep min_block_size=1,3 target=onnxruntime,eager`: what the sweep varies."""
    values = dict(map(split_override, overrides))
    values.update({k: str(v) for k, v in (search_params or {}).items()})
    parts = [f"{short(k, swept)}={values.get(k, '?')}" for k in swept]
    return " ".join(["sweep", *parts]) if parts else "sweep"


def single_name(model: str, target: str, now: float | None = None) -> str:
    return f"{model} {target} {time.strftime('%m-%d %H:%M:%S', time.localtime(now))}"


def tensor_text(spec: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in spec["shape"])
    return f"{shape} {spec['dtype']}" + (" keyword" if spec.get("keyword") else "")


def params(config: dict[str, Any]) -> dict[str, str]:
    """The resolved config flattened to the params worth a column in the runs table."""
    flat = flatten({k: v for k, v in config.items() if k != "input"})
    precision = str(config["compile"]["precision"])
    out = {}
    for key, value in flat.items():
        if key.startswith(DROPPED_PREFIXES) or key in DROPPED_KEYS:
            continue
        if key.startswith("validate.tolerances.") and not key.startswith(f"validate.tolerances.{precision}."):
            continue
        out[key] = str(value)
    spec = config["input"]
    out["input.name"] = str(spec["name"])
    for tensor in spec["tensors"]:
        out[f"input.{tensor['name']}"] = tensor_text(tensor)
    for dim, bounds in (spec.get("dims") or {}).items():
        out[f"input.dims.{dim}"] = "/".join(str(bounds[c]) for c in ("min", "opt", "max") if c in bounds)
    if spec.get("extra_profiles"):
        out["input.extra_profiles"] = str(len(spec["extra_profiles"]))
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
