"""Validate: accuracy against eager PyTorch and latency of both on one harness.

Dynamic inputs are checked at opt, min, max and a few random sizes between (engines that
only work at their profile's corners are a classic failure); every figure is reported
per shape as well as over all of them, and latency is timed at opt (and at min and max
with validate.latency_at_corners).

The reference is the eager model rebuilt from its config at fp32; export's weight hash
proves it is the model that was compiled. Latency compares the compiled module with the
eager model at the same precision on the same device, interleaved in one process, with
one CPU thread budget for both (validate.threads; auto: the cores free now, see
timing.thread_budget), recorded in the report and as the latency_threads metric.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pipeline import layout, shapes, task_metrics, throughput, timing
from pipeline.accuracy import compare, figures
from pipeline.accuracy import failures as failures_of
from pipeline.dtypes import is_quantized, precisions_of
from pipeline.errors import ArtifactError
from pipeline.files import load_json, write_json
from pipeline.models import build_model, cast_model, caster, flat_outputs, weights_digest
from pipeline.stage import INPUT_KEYS, MODEL_KEYS, Metrics, StageContext, StageSpec
from pipeline.targets import RUNNING

FILES = layout.VALIDATE
# On a GPU each timing round lasts at least this long (and warm-up too: clocks ramp up under
# load): a sub-millisecond call's round of 200 calls is 0.1 s, which one hiccup can move.
GPU_ROUND_SECONDS = 0.5


def achieved_precision(engines: dict[str, Any], wanted: str) -> tuple[str | None, list[str]]:
    """The precisions the engines compute in (from their networks' tensor dtypes), and failures.

    Strongly typed engines silently stay fp32 when the cast did not reach the graph (a
    custom exporter, a model that casts back): asking for fp16 and getting fp32 is an error.
    `wanted` is what the target was asked for (Target.precision_asked).
    """
    dtypes = {d for seg in engines["segments"] for d in seg.get("precision", [])}
    if not any("precision" in seg for seg in engines["segments"]):
        if is_quantized(wanted):  # quantized engines must show it: no report is no int8
            return None, [f"asked for {wanted} but no engine reports {wanted} compute "
                          f"({len(engines['segments'])} engine(s); nothing was quantized)"]
        return None, []
    names = precisions_of(dtypes)
    achieved = "+".join(names) or None
    if wanted != "fp32" and wanted not in names:
        what = f" (no QDQ/QLinear kernels, no {wanted.upper()} tensors)" if is_quantized(wanted) else ""
        return achieved, [f"asked for {wanted} but the engines compute in {achieved or 'no floating type'}{what} "
                          f"(tensor dtypes: {', '.join(sorted(dtypes))})"]
    return achieved, []


def run(ctx: StageContext) -> Metrics:
    cfg = ctx.config
    precision = cfg.compile.precision
    reference = build_model(cfg.model)
    model_meta = load_json(ctx.inputs["export"] / layout.EXPORT.model, "export metadata")
    if weights_digest(reference) != model_meta["weights_sha256"]:
        raise ArtifactError(
            f"model {cfg.model.name} rebuilt with different weights than the exported one "
            "(its factory is not deterministic under model.seed).",
            "make the factory deterministic, or load fixed weights with model.weights.",
        )
    engines = load_json(ctx.inputs["build"] / layout.BUILD.engines, "engine list")
    achieved, failures = achieved_precision(engines, ctx.target.precision_asked(precision))
    achieved = achieved or graph_precision(ctx)
    tags = {"precision.achieved": achieved} if achieved else {}
    not_here = ctx.target.can_execute()
    if not_here:
        ctx.warn(f"engines were built but cannot run here: {not_here}; accuracy and latency not measured")
        write_json(ctx.out / FILES.report, {"validated": False, "reason": not_here,
                                            "passed": not failures, "failures": failures,
                                            "precision": precision, "precision_achieved": achieved,
                                            "accuracy": None, "latency": None, "warnings": list(ctx.notes)})
        return {"validated": 0.0, **tags}
    device = ctx.target.device()
    threads = set_threads(ctx, engines)  # before the engines load: their thread pools are sized then
    compiled, loading = load_compiled(ctx, device)
    checks = shape_checks(cfg.input, cfg.validate)
    accuracy, per_shape, accuracy_failures = check_accuracy(ctx, reference, compiled, checks, device)
    task, accuracy_failures = task_metrics.validate(ctx, reference, compiled, device, accuracy_failures)
    failures += accuracy_failures
    before = timing.allocated_mb(device)
    eager = cast_model(reference, precision).to(device)
    resident = {"compiled": loading["resident_mb"], "eager": timing.allocated_mb(device) - before}
    latency = time_latency(ctx, eager, compiled, checks, device)
    memory = (gpu_memory(ctx, {"eager": eager, "compiled": compiled}, resident, loading["outside_mb"])
              if device == "cuda" else None)
    best = search_throughput(ctx, compiled, device) if cfg.validate.throughput.enabled else None
    graphs = engine_graphs(ctx, compiled)
    report = {
        "validated": True, "passed": not failures, "failures": failures,
        "precision": precision, "precision_achieved": achieved, "device": device,
        "num_samples": sum(c[2] for c in checks),
        "accuracy": accuracy, "shapes": per_shape, "tolerance": dict(cfg.validate.tolerances[precision]),
        "latency": {**latency["opt"], "method": latency_method(device, latency, graphs), "threads": threads, "at": latency},
        "engine_load_seconds": loading["seconds"], "engine_cuda_graphs": graphs, "gpu_memory_mb": memory,
        "quantization": quantization_summary(ctx), "throughput": best, "task": task, "warnings": list(ctx.notes),
    }
    write_json(ctx.out / FILES.report, report)
    metrics = {**report_metrics(accuracy, per_shape, latency, failures), **tags,
               "engine_load_seconds": loading["seconds"], "latency_threads": float(threads["threads"]),
               **(task_metrics.metrics(task) if task else {})}
    if best and best["chosen"]:
        metrics.update({"throughput.chosen_batch": float(best["chosen_batch"]),
                        "throughput.chosen_per_s": best["chosen"]["throughput_per_s"]})
    if memory:
        metrics.update({"gpu_mem_peak_mb": memory["compiled"]["peak"], "eager/gpu_mem_peak_mb": memory["eager"]["peak"]})
    return metrics


def set_threads(ctx: StageContext, engines: dict[str, Any]) -> dict[str, Any]:
    """One CPU thread budget for eager PyTorch and the engines alike, and why it is that.

    A speedup of an engine with every core over eager fighting for them (or the reverse)
    measures the threads, not the engine.
    """
    import torch

    budget, why = timing.thread_budget(int(ctx.config.validate.threads))
    threads = ctx.target.engine_threads(budget, engines)
    if threads != budget:
        why += f"; the engines run with {threads} (set in target or at build), so eager gets {threads} too"
    torch.set_num_threads(threads)
    return {"threads": threads, "reason": why}


def quantization_summary(ctx: StageContext) -> dict[str, Any] | None:
    """An int8 build's layers kept in fp32 and what each round cost and bought (build/quantization.json)."""
    path = ctx.inputs["build"] / "quantization.json"
    if not path.is_file():
        return None
    built = load_json(path, "quantization report")
    return {k: built.get(k) for k in ("kept_fp32", "chosen_round", "rounds")}


def load_compiled(ctx: StageContext, device: str):
    """The hybrid program on `device`, with how long loading took (engines compiling or warming included)."""
    from pipeline import hybrid

    outside = timing.outside_torch_mb(device)
    before, started = timing.allocated_mb(device) + outside, time.perf_counter()
    with ctx.console.status(f"loading the engines on {device}"):
        compiled = hybrid.assemble(ctx.inputs["lower"], ctx.inputs["partition"], ctx.inputs["build"],
                                   ctx.target).to(device)
    seconds = round(time.perf_counter() - started, 3)
    outside = timing.outside_torch_mb(device)
    return compiled, {"seconds": seconds, "outside_mb": outside,
                      "resident_mb": timing.allocated_mb(device) + outside - before}


def graph_precision(ctx: StageContext) -> str | None:
    """The precisions of the graph the engines were built from, as partition recorded them."""
    report = load_json(ctx.inputs["partition"] / layout.PARTITION.report, "partition report")
    return "+".join(report.get("graph_precisions") or []) or None


def latency_method(device: str, latency: dict[str, Any], engine_graphs: int = 0) -> str:
    if device != "cuda":
        return "perf_counter, per call; trusted by the spread of the rounds' medians"
    graphed = latency["opt"].get("cuda_graph")
    return ("GPU compute: CUDA events around each call; host_*: enqueue and wait, wall clock; trusted by the "
            "spread of the rounds' medians" + (", compiled module replayed from a CUDA graph" if graphed else "")
            + (f", {engine_graphs} engine(s) replaying CUDA graphs of their own" if engine_graphs else ""))


def gpu_memory(ctx: StageContext, modules: dict[str, Any], resident: dict[str, float],
               outside_after_load: float) -> dict[str, Any]:
    """Peak GPU memory of each module at opt: what it holds (weights, engines, graph pools) plus one call's peak.

    Engines that allocate outside torch (ONNX Runtime's arena, TensorRT) are seen through
    the device's free memory: what they took while loading is resident, and what their
    arenas grew by since (calls of accuracy and timing) is transient.
    """
    import torch

    cfg = ctx.config
    sample = shapes.make(cfg.input, shapes.corners(cfg.input)["opt"], 1, seed_offset=1)[0].to(
        "cuda", caster(cfg.compile.precision))
    out: dict[str, Any] = {"method": "torch's CUDA allocator, plus the device memory other allocators took"}
    grown = {"compiled": max(0.0, timing.outside_torch_mb("cuda") - outside_after_load), "eager": 0.0}
    for who, module in modules.items():
        with torch.no_grad():
            transient = grown[who] + timing.transient_peak_mb(lambda m=module: sample(m))
        out[who] = {"resident": round(resident[who], 3), "transient": round(transient, 3),
                    "peak": round(resident[who] + transient, 3)}
    return out


def check_accuracy(ctx: StageContext, reference, compiled, checks, device: str):
    """(accuracy over every shape, per-shape entries, failures), comparing with fp32 eager."""
    import torch

    cfg = ctx.config
    cast = caster(cfg.compile.precision)
    tolerance = dict(cfg.validate.tolerances[cfg.compile.precision])
    classifier = cfg.model.task == "classification"
    per_shape, ref_all, got_all, failures = [], [], [], []
    with torch.no_grad(), ctx.console.status("checking accuracy against eager PyTorch") as status:
        for i, (name, dims, count) in enumerate(checks):
            status.update(f"checking accuracy against eager PyTorch at {name} ({shapes.label(dims)})")
            batches = task_metrics.real_batches(cfg, name) or shapes.make(cfg.input, dims, count,
                                                                          seed_offset=1 + 1000 * i)
            ref = [flat_outputs(b(reference)) for b in batches]
            got = [flat_outputs(b.to(device, cast)(compiled)) for b in batches]
            acc = compare(ref, got, classifier)
            shape_failures = failures_of(acc, tolerance)
            failures += [f"at {name} ({shapes.label(dims)}): {f}" if len(checks) > 1 else f for f in shape_failures]
            per_shape.append({"name": name, "dims": dims, "samples": count, "accuracy": acc,
                              "passed": not shape_failures})
            ref_all += ref
            got_all += got
    overall = compare(ref_all, got_all, classifier)  # over every shape: the worst case counts
    if overall["constant"]:
        ctx.warn(f"model {cfg.model.name}'s output is constant over every sample checked (the same value "
                 "whatever the input), so agreement with eager says little about the engines; check its "
                 "weights (model.weights) or its head")
    return overall, per_shape, failures


def time_latency(ctx: StageContext, eager, compiled, checks, device: str) -> dict[str, Any]:
    """Eager and compiled interleaved at opt (and min/max with validate.latency_at_corners)."""
    import torch

    cfg, vcfg = ctx.config, ctx.config.validate
    cast = caster(cfg.compile.precision)
    timed = [c for c in checks if c[0] == "opt" or (vcfg.latency_at_corners and c[0] in ("min", "max"))]
    latency: dict[str, Any] = {}
    for name, dims, _ in timed:
        sample = shapes.make(cfg.input, dims, 1, seed_offset=1)[0].to(device, cast)

        def call(module, sample=sample):
            def fn():
                with torch.no_grad():
                    sample(module)
            return fn

        compiled_fn, graphed = call(compiled), False
        if vcfg.cuda_graph and device == "cuda":
            compiled_fn, graphed = graph_or_warn(ctx, compiled_fn)
        iterations = max(vcfg.iterations, vcfg.gpu_iterations) if device == "cuda" else vcfg.iterations
        with ctx.console.status(f"timing eager and compiled at {name} (interleaved)") as status:
            stats = timing.measure({"eager": call(eager), "compiled": compiled_fn}, warmup=vcfg.warmup,
                            iterations=iterations, rounds=vcfg.rounds, min_seconds=vcfg.min_seconds,
                            batch_size=shapes.batch_size(cfg.input, dims), cuda=device == "cuda",
                            round_seconds=GPU_ROUND_SECONDS if device == "cuda" else 0.0,
                            on_progress=lambda r, n=name: status.update(f"timing eager and compiled at {n}: round {r}"))
        for who, st in stats.items():
            if st.median_spread > vcfg.spread_warn_threshold:
                ctx.warn(f"{who} latency at {name} varies too much to trust: the medians of its "
                         f"{len(st.round_medians_ms)} rounds spread {st.median_spread:.1%} "
                         f"> {vcfg.spread_warn_threshold:.0%}; quiet the machine or raise validate.iterations")
        latency[name] = {"dims": dims, "compiled": stats["compiled"].as_dict(), "eager": stats["eager"].as_dict(),
                         "speedup": stats["eager"].p50_ms / stats["compiled"].p50_ms, "cuda_graph": graphed}
    return latency


def search_throughput(ctx: StageContext, compiled, device: str) -> dict[str, Any] | None:
    """validate.throughput: the batch with the most throughput under the p99 budget, on this one engine."""
    import torch

    cfg, vcfg = ctx.config, ctx.config.validate
    dim = throughput.batch_dim(cfg.input)
    if dim is None:
        ctx.warn("validate.throughput needs a dynamic batch (the first input's first size named in input.dims, "
                 "min < max), so that one engine serves every batch; not searched")
        return None
    opt, cast = shapes.corners(cfg.input)["opt"], caster(cfg.compile.precision)

    def time_at(batch: int) -> timing.LatencyStats:
        sample = shapes.make(cfg.input, {**opt, dim: batch}, 1, seed_offset=2)[0].to(device, cast)

        def fn():
            with torch.no_grad():
                sample(compiled)
        return timing.measure({"compiled": fn}, warmup=vcfg.warmup, iterations=vcfg.throughput.iterations,
                              rounds=vcfg.rounds, min_seconds=0.0, batch_size=batch, cuda=device == "cuda")["compiled"]

    sizes = throughput.batches(int(cfg.input.dims[dim].min), int(cfg.input.dims[dim].max),
                               list(vcfg.throughput.batches))
    with ctx.console.status("throughput search") as status:
        found = throughput.search(time_at, sizes, float(vcfg.throughput.p99_budget_ms),
                                  on_point=lambda p: status.update(f"throughput search: batch {p['batch']} done"))
    ctx.console.print(throughput.table(found), markup=False)
    throughput.plot(found, ctx.out / "throughput.png", f"{cfg.model.name} {cfg.compile.precision} on {device}")
    return found


def engine_graphs(ctx: StageContext, compiled) -> int:
    """How many engines replay a CUDA graph of their own (ONNX Runtime's enable_cuda_graph).

    Read after the engines ran: a graph is captured on the first calls, and an engine whose
    capture failed runs on without one, with a note that becomes a warning here.
    """
    runners = [m.runner for m in compiled.modules() if hasattr(m, "runner")]
    for runner in runners:
        if getattr(runner, "note", None):
            ctx.warn(runner.note)
    return sum(bool(getattr(runner, "cuda_graph", False)) for runner in runners)


def graph_or_warn(ctx: StageContext, fn):
    """(fn replayed from a CUDA graph, True), or (fn, False) with a warning where it cannot be captured."""
    import torch

    try:
        return timing.cuda_graphed(fn), True
    except Exception as err:  # capture fails in many ways (host syncs, graphs of the module's own)
        torch.cuda.synchronize()
        ctx.warn(f"validate.cuda_graph: the compiled module cannot be captured in a CUDA graph "
                 f"({(str(err).splitlines() or [type(err).__name__])[0]}); timed without one")
        return fn, False


def report_metrics(accuracy: dict[str, Any], per_shape: list, latency: dict[str, Any], failures: list) -> Metrics:
    """The figures logged as metrics: accuracy (per shape too), latency of both, speedup."""
    c, e = latency["opt"]["compiled"], latency["opt"]["eager"]
    metrics = figures(accuracy)
    # Tiny errors read as 0.00 on MLflow's chart axes; their log10 charts readably.
    metrics["rel_l2_err_log10"] = math.log10(max(accuracy["rel_l2_err"], 1e-30))
    if len(per_shape) > 1:  # each figure named by the shape it belongs to
        for entry in per_shape:
            metrics.update({f"{k}.{entry['name']}": v for k, v in figures(entry["accuracy"]).items()})
    metrics.update({
        "validated": 1.0,
        "accuracy_passed": float(not failures),
        "latency_p50_ms": c["p50_ms"], "latency_p90_ms": c["p90_ms"], "latency_p99_ms": c["p99_ms"],
        "latency_mean_ms": c["mean_ms"], "latency_std_ms": c["std_ms"], "latency_cv": c["cv"],
        "latency_median_spread": c["median_spread"], "eager/latency_median_spread": e["median_spread"],
        "host_latency_p50_ms": c["host_p50_ms"], "host_latency_p99_ms": c["host_p99_ms"],
        "throughput_per_s": c["throughput_per_s"],
        "eager/latency_p50_ms": e["p50_ms"], "eager/latency_p90_ms": e["p90_ms"], "eager/latency_p99_ms": e["p99_ms"],
        "eager/latency_mean_ms": e["mean_ms"], "eager/latency_cv": e["cv"], "eager/throughput_per_s": e["throughput_per_s"],
        "speedup": latency["opt"]["speedup"],
    })
    for name, entry in latency.items():
        if name != "opt":
            metrics.update({f"latency_p50_ms.{name}": entry["compiled"]["p50_ms"],
                            f"eager/latency_p50_ms.{name}": entry["eager"]["p50_ms"],
                            f"speedup.{name}": entry["speedup"]})
    return metrics


def shape_checks(input_cfg, vcfg) -> list[tuple[str, dict[str, int], int]]:
    """(name, dims, samples) to check: opt; for dynamic inputs also min, max and random sizes between."""
    corners = shapes.corners(input_cfg)
    checks = [("opt", corners["opt"], int(vcfg.num_samples))]
    if shapes.is_dynamic(input_cfg):
        n = int(vcfg.corner_samples)
        checks += [("min", corners["min"], n), ("max", corners["max"], n)]
        for i, dims in enumerate(shapes.random_dims(input_cfg, int(vcfg.random_shapes), int(input_cfg.seed) + 7)):
            checks.append((f"random{i}", dims, n))
    return checks


# Measurements are of this moment on this machine: reused only with validate.cache=true.
SPEC = StageSpec(
    name="validate", version=7, run=run, inputs=("export", "lower", "partition", "build"),
    reads=(*MODEL_KEYS, "model.task", *INPUT_KEYS, "compile.precision", "validate", "data"),
    labels=("model.name",), asks=RUNNING, writes=FILES, cacheable="validate.cache",
)
