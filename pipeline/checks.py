"""Settings checked before any stage runs: ranges, tolerances, writable paths.

Hydra checks types; it cannot know that `validate.iterations=0` leaves nothing to time
or that `paths.cache` names a regular file. Left alone, such values fail after the
whole build (a division by zero in the timing statistics, a publish into a file) or,
worse, are accepted and quietly change the meaning of a result (`validate.rounds=0`,
`compile.min_block_size=0`). Each is a ConfigError here, in one line naming the
setting, the value and what is allowed, before export spends a second.

The model factory is not imported here: that would load torchvision (or the user's
package) into the orchestrator, which stays cheap; export reports a factory that fails
to import or to build in one line (pipeline.models).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pipeline import calibration, data
from pipeline.errors import ConfigError, TargetUnavailable
from pipeline.models import check_weights

# Dotted key -> (lowest allowed, highest allowed or None, whether the lowest is excluded).
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "validate.num_samples": (1, None, False),
    "validate.corner_samples": (1, None, False),
    "validate.random_shapes": (0, None, False),
    "validate.warmup": (0, None, False),
    "validate.iterations": (1, None, False),
    "validate.rounds": (1, None, False),
    "validate.min_seconds": (0, None, False),
    "validate.threads": (0, None, False),
    "validate.gpu_iterations": (1, None, False),
    "validate.spread_warn_threshold": (0, None, True),
    "validate.throughput.p99_budget_ms": (0, None, True),
    "validate.throughput.iterations": (1, None, False),
    "compile.min_block_size": (1, None, False),
    "compile.optimization_level": (0, 5, False),
    "compile.workspace_size": (0, None, False),
}
# Settings where infinity means "never stop": a timing loop that runs forever.
FINITE = ("validate.min_seconds",)
# Tolerance gate -> its allowed range (None disables a gate).
TOLERANCES: dict[str, tuple[float, float | None]] = {
    "max_abs_err": (0.0, None),
    "rel_l2_err": (0.0, None),
    "min_cosine_similarity": (-1.0, 1.0),
    "min_top1_agreement": (0.0, 1.0),
}


def check_target(config: dict[str, Any]) -> None:
    """The target's settings against the choices and ranges its Settings declare, and the device it asks
    for: before the target is made, so a wrong value is one line, not an error from inside the target."""
    from pipeline import schema, targets

    target = config["target"]
    schema.check("target", targets.target_class(target["name"]).Settings, target)  # enums and ranges declared there
    check_device(target.get("device"))


def check_settings(config: dict[str, Any], target) -> None:
    """Every cheap check of the resolved config, in the order a user reads the settings.

    `target` is the job's target, made (device resolved) but not yet configured: its quantizer
    answers for compile.precision=int8/fp8 with the settings it will build with.
    """
    for key, (low, high, exclusive) in RANGES.items():
        _check_range(key, _get(config, key), low, high, exclusive)
    validate = config["validate"]
    if validate["rounds"] > validate["iterations"]:
        raise ConfigError(
            f"validate.rounds={validate['rounds']} is more than validate.iterations={validate['iterations']}: "
            "each round times at least one iteration, so rounds must be <= iterations.",
            f"lower validate.rounds or raise validate.iterations (e.g. validate.rounds={validate['iterations']}).",
        )
    _check_tolerances(validate["tolerances"], config["compile"]["precision"])
    check_weights(config)  # a local model.weights file: keyed by its sha256
    data.check(config)  # real data loads and splits; validate is keyed by its sha256
    check_quantization(config, target)  # int8/fp8: the target can quantize this job's settings
    calibration.check(config)  # int8/fp8: the data loads and fits; keyed by its sha256
    for key in ("paths.outputs", "paths.cache"):
        check_writable_dir(key, _get(config, key))


def check_device(asked: str | None) -> None:
    """A device asked for by name must be here, for every target: refused now, not at build (or never)."""
    from pipeline import targets

    missing = targets.cuda_missing() if asked == "cuda" else None
    if missing:
        raise TargetUnavailable(f"target.device=cuda was asked for, but there is {missing}.",
                                "use target.device=auto or cpu here, or run on a machine with a CUDA GPU.")


def check_quantization(config: dict[str, Any], target) -> None:
    """compile.precision=int8/fp8: the target has a quantizer for it (in quantize.mode), and its
    quantizer can serve this job's settings; else one ConfigError line naming who can."""
    from pipeline.targets import quantizing

    precision, mode, name = config["compile"]["precision"], config["quantize"]["mode"], target.name
    if target.quantization_route(precision) is None:
        return
    if target.quantizer(precision) is None:
        able = ("target=onnxruntime (or tensorrt, torch_tensorrt on a GPU, or inductor on the CPU)"
                if precision == "int8" else "target=tensorrt (or torch_tensorrt, or inductor on a GPU of compute "
                "capability 8.9+)")
        reason = target.no_quantizer.get(precision) or (
            f"it has no {precision} quantizer in this pipeline (targets that quantize to {precision}: "
            f"{', '.join(quantizing(precision))}); it would build fp32 engines")
        raise ConfigError(f"target {name} cannot build compile.precision={precision}: {reason}.",
                          f"use {able}, or compile.precision=fp32.")
    able = quantizing("int8", mode)
    if mode == "static" or target.quantizer(precision, mode):
        refused = target.quantizer_refusal(config, precision)
    elif mode == "dynamic":
        refused = (f"quantize.mode=dynamic (activation scales at run time) is {', '.join(able)}'s int8 route, and "
                   f"{name} {'has no dynamic quantizer' if precision == 'int8' else 'would build ' + precision}",
                   f"set quantize.mode=static, or use target={able[0] if able else 'onnxruntime'} with int8")
    else:
        refused = (f"quantize.mode=weight_only (int8 weights, float compute) is {', '.join(able)}'s int8 route on "
                   f"CUDA, and {name} {'has none' if precision == 'int8' else 'would build ' + precision}",
                   "set quantize.mode=static, or use target=inductor target.device=cuda with int8")
    if refused:
        raise ConfigError(f"target {name} cannot build compile.precision={precision} here: {refused[0]}.",
                          f"{refused[1]}, or compile.precision=fp32.")


def _get(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def _describe(low: float, high: float | None, exclusive: bool) -> str:
    if high is not None:
        return f"between {low:g} and {high:g}"
    return f"{'>' if exclusive else '>='} {low:g}"


def _check_range(key: str, value: Any, low: float, high: float | None, exclusive: bool) -> None:
    """`value` within [low, high] (or above low when exclusive); NaN is never within anything."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (value > low if exclusive else value >= low) and (high is None or value <= high)
    if ok and key in FINITE and math.isinf(value):
        ok = False
    if not ok:
        allowed = _describe(low, high, exclusive) + (" and finite" if key in FINITE else "")
        raise ConfigError(f"{key}={value} is out of range: it must be {allowed}.",
                          f"set {key} to a value {allowed} (the default is {_default(key)}).")


def _default(key: str) -> Any:
    """The schema's default for `key`, to suggest in a fix."""
    from pipeline.config import CompileConfig, ValidateConfig

    group, name = key.split(".")
    return getattr({"compile": CompileConfig, "validate": ValidateConfig}[group], name)


def _check_tolerances(tolerances: dict[str, Any], precision: str) -> None:
    """Each gate None or a finite number in its range; the precision compiled for needs an entry."""
    if precision not in tolerances:
        raise ConfigError(f"validate.tolerances has no entry for compile.precision={precision} "
                          f"(it has {', '.join(sorted(tolerances)) or 'none'}).",
                          f"keep validate.tolerances.{precision} (set a gate to null to disable it, "
                          f"e.g. validate.tolerances.{precision}.rel_l2_err=null).")
    for name, gates in tolerances.items():
        for gate, (low, high) in TOLERANCES.items():
            value = (gates or {}).get(gate)
            if value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < low or (high is not None and value > high):
                allowed = _describe(low, high, False)
                raise ConfigError(f"validate.tolerances.{name}.{gate}={value} is out of range: it must be "
                                  f"{allowed}, or null to disable the gate.",
                                  f"set validate.tolerances.{name}.{gate} to a value {allowed}, or null.")


def check_writable_dir(key: str, value: str) -> None:
    """`value` is a writable directory, or one that can be created: no regular file on its way."""
    path = Path(value).expanduser().absolute()
    example = "outputs/cache" if key == "paths.cache" else "outputs"
    fix = f"point {key} at a writable directory (or one that can be created), e.g. {key}={example}."
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value} is a regular file, not a directory.", fix)
    existing = path
    while not existing.exists():  # the nearest ancestor that exists decides whether it can be created
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={value} cannot be created: {existing} is a regular file, not a directory.", fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"{key}={value} {what}.", fix)
