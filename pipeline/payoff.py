"""The baseline chain of an int8/fp8 job: the same target's engines at the precision quantization
replaces (fp32 on the CPU, fp16 on a GPU), built or taken from the cache, then stages/payoff.py
times both interleaved in one process.

The baseline stages run with the job's config at the baseline precision into `baseline/` of the
run folder; their keys are those an fp32 (fp16) job of the same model gets, so a sweep over
precisions builds each baseline once. Their records are named `baseline/<stage>` and their
figures are not the job's: only their timings are recorded.
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline import targets
from pipeline.dtypes import is_quantized

BASELINE_STAGES = ("export", "lower", "partition", "convert", "build")
# The baseline chain's folder in the run folder, and its stages' record names' prefix.
BASELINE = "baseline"


def baseline_precision(device: str) -> str:
    """What a quantized engine replaces: fp16 where a GPU computes, fp32 on the CPU."""
    return "fp16" if device == "cuda" else "fp32"


def wanted(config: dict[str, Any]) -> bool:
    return is_quantized(config["compile"]["precision"])


def run(runner, result, tracker, keys: dict[str, str], target, by_name: dict[str, Any]) -> None:
    """Baseline export..build (cache hits where an fp32/fp16 job built them), then the payoff stage.

    `by_name`: the stage specs by name (stages.BY_NAME; only the runner imports the stages)."""
    config = copy.deepcopy(runner.config)
    config["compile"]["precision"] = baseline_precision(target.device())
    base_target = targets.make(runner.target_name, config["target"])
    base_target.configure(config["compile"])  # the plain resolved dict, as the job's own target
    resolved = runner.resolve(base_target, config)  # once for the chain
    base_dir = runner.run_dir / BASELINE
    base_keys: dict[str, str] = {}
    for name in BASELINE_STAGES:
        spec = by_name[name]
        base_keys[name] = runner.record_stage(
            result, tracker, spec, lambda s=spec: runner.run_stage(s, base_keys, base_target, config, base_dir, resolved),
            label=f"{BASELINE}/{name}")
    upstream = {**keys, **{f"{BASELINE}/{k}": v for k, v in base_keys.items()}}
    spec = by_name["payoff"]
    runner.record_stage(result, tracker, spec, lambda: runner.run_stage(spec, upstream, target))


def summary_line(m: dict[str, Any]) -> str | None:
    """The run summary's line: the speedup against the baseline precision, flagged when it does not pay."""
    key = next((k for k in m if k.startswith("quantize/speedup_vs_")), None)
    if key is None:
        return None
    base = key.rsplit("_", 1)[1]
    verdict = "pays" if m.get("quantize/pays") else "DOES NOT PAY (not faster)"
    return (f"quantization {verdict}: {m[key]:.2f}x the {base} engine of the same target "
            f"({m.get(f'quantize/{base}_latency_p50_ms', float('nan')):.3f} ms p50, interleaved)")
