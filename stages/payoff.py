"""Payoff: does quantization pay? The int8/fp8 program against the same target's program at the
precision it replaces (fp32 on the CPU, fp16 on a GPU), timed interleaved in one process.

The most common complaint in the quantization trackers of TensorRT, Model Optimizer and
optimum is an int8 engine slower than the fp16 one, shipped because nobody compared the
two. The runner builds (or takes from the cache) the baseline chain into `baseline/` of
the run folder; this stage loads both programs and times them on one harness. A program
that is not faster is a warning in the summary and MLflow (`quantize/pays`=0); with
`quantize.require_speedup=true` it fails the job in one line.
"""

from __future__ import annotations

from pipeline import shapes, timing
from pipeline.errors import CompileError
from pipeline.files import write_json
from pipeline.models import caster
from pipeline.payoff import BASELINE, baseline_precision
from pipeline.stage import INPUT_KEYS, Metrics, StageContext, StageSpec
from pipeline.targets import RUNNING

REPORT = "report.json"


def verdict(speedup: float, required: bool) -> str:
    """pays (faster), flag (not faster: a warning) or fail (not faster and quantize.require_speedup)."""
    if speedup > 1.0:
        return "pays"
    return "fail" if required else "flag"


def run(ctx: StageContext) -> Metrics:
    from pipeline import hybrid

    cfg, vcfg = ctx.config, ctx.config.validate
    precision, device = cfg.compile.precision, ctx.target.device()
    base = baseline_precision(device)
    if ctx.target.can_execute():
        write_json(ctx.out / REPORT, {"measured": False, "reason": ctx.target.can_execute()})
        return {}
    programs = {}
    with ctx.console.status(f"loading the {precision} and {base} programs"):
        for who, prefix in ((precision, ""), (base, f"{BASELINE}/")):
            programs[who] = hybrid.assemble(ctx.inputs[f"{prefix}lower"], ctx.inputs[f"{prefix}partition"],
                                            ctx.inputs[f"{prefix}build"], ctx.target).to(device)
    dims = shapes.corners(cfg.input)["opt"]
    sample = shapes.make(cfg.input, dims, 1, seed_offset=1)[0]
    casts = {precision: caster(precision), base: caster(base)}

    def call(who):
        moved = sample.to(device, casts[who])

        def fn():
            import torch

            with torch.no_grad():
                moved(programs[who])
        return fn

    with ctx.console.status(f"timing {precision} and {base} (interleaved)"):
        stats = timing.measure({who: call(who) for who in programs}, warmup=vcfg.warmup, iterations=vcfg.iterations,
                               rounds=vcfg.rounds, min_seconds=vcfg.min_seconds,
                               batch_size=shapes.batch_size(cfg.input, dims), cuda=device == "cuda")
    speedup = stats[base].p50_ms / stats[precision].p50_ms
    decision = verdict(speedup, bool(cfg.quantize.require_speedup))
    pays = decision == "pays"
    line = (f"{precision} p50 {stats[precision].p50_ms:.3f} ms vs {base} {stats[base].p50_ms:.3f} ms "
            f"on {ctx.target.name}: {speedup:.2f}x")
    write_json(ctx.out / REPORT, {"measured": True, "precision": precision, "baseline": base, "pays": pays,
                                  "speedup": speedup, precision: stats[precision].as_dict(),
                                  base: stats[base].as_dict(), "required": bool(cfg.quantize.require_speedup)})
    if decision == "fail":
        raise CompileError(f"quantization does not pay: {line} (quantize.require_speedup=true).",
                           f"keep compile.precision={base}, or quantize a larger model or batch.")
    if pays:
        ctx.console.print(f"quantization pays: {line}", markup=False, highlight=False)
    else:
        ctx.warn(f"quantization does not pay: {line}; the {base} engine is as fast or faster")
    return {f"quantize/speedup_vs_{base}": speedup, "quantize/pays": float(pays),
            f"quantize/{base}_latency_p50_ms": stats[base].p50_ms}


# Run by the runner after validate for int8/fp8 jobs only; its inputs under baseline/ are the
# baseline chain's folders. Measurements of this moment: never reused.
SPEC = StageSpec(
    name="payoff", version=1, run=run,
    inputs=("export", "lower", "partition", "build", f"{BASELINE}/lower", f"{BASELINE}/partition",
            f"{BASELINE}/build"),
    reads=(*INPUT_KEYS, "compile.precision", "validate", "quantize.require_speedup"),
    asks=RUNNING, cacheable=False,
)
