"""Allowed values declared on the schema fields themselves, and the one check that reads them.

Hydra checks a setting's type when it composes; it cannot know that
`target.graph_optimization_level` takes four words or that a thread count is not
negative. Left to the code that uses them, such values failed late (a KeyError
traceback at build, ONNX's version converter at convert) or were accepted. Each field
states what it allows (`choice`, `bounded`) where it is defined, and `check` walks a
schema's fields before any stage: a new setting is checked by declaring it, not by
adding a check somewhere else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pipeline.errors import ConfigError


def choice(default: Any, allowed: tuple[Any, ...] | Any) -> Any:
    """A field whose value is one of `allowed` (or None, where the default is None)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(allowed)})


def bounded(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """A numeric field within [low, high] (either end open when None; None allowed where the default is)."""
    return dataclasses.field(default=default, metadata={"low": low, "high": high})


def allowed(f: dataclasses.Field) -> str | None:
    """What a field allows, in words (None: anything of its type)."""
    meta = f.metadata
    if "choices" in meta:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    if "low" in meta or "high" in meta:
        low, high = meta.get("low"), meta.get("high")
        if low is not None and high is not None:
            return f"between {low:g} and {high:g}"
        return f">= {low:g}" if low is not None else f"<= {high:g}"
    return None


def _ok(f: dataclasses.Field, value: Any) -> bool:
    if value is None and f.default is None:
        return True
    meta = f.metadata
    if "choices" in meta:
        return value in meta["choices"]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    low, high = meta.get("low"), meta.get("high")
    return number and (low is None or value >= low) and (high is None or value <= high)


def check(prefix: str, schema: type, values: dict[str, Any]) -> None:
    """Every field of `schema` that declares what it allows, against `values`: one ConfigError line."""
    for f in dataclasses.fields(schema):
        rule = allowed(f)
        if rule is None or f.name not in values or _ok(f, values[f.name]):
            continue
        default = {dataclasses.MISSING: "", None: ", or null (the default)"}.get(f.default, f" (the default is {f.default})")
        raise ConfigError(f"{prefix}.{f.name}={values[f.name]} is not allowed: it must be {rule}.",
                          f"set {prefix}.{f.name} to {rule}{default}.")
