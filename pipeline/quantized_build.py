"""The int8 (and fp8) build (stages/build.py): calibrate every segment with its real inputs, then rounds
that buy accuracy back. Orchestration beside the build stage; the tools it drives are pipeline.quantize.

Round 0 quantizes every layer the target can. Where the engines can run here, the
program (engines plus the PyTorch segments between them) is checked against the fp32
program on calibration batches with validate.tolerances.<precision>; when it fails, per-layer
sensitivity (pipeline.quantize.sensitivity) names the worst layers, they stay in fp32,
and the segments are rebuilt, up to quantize.max_rounds. With quantize.smooth_alpha set, the
first remedy is SmoothQuant (pipeline.quantize.smooth) instead: on a trained transformer the
error is spread over every layer through activation outliers, and keeping two layers a round
barely moves it (the tuning order of Intel Neural Compressor's accuracy-aware loop, too). Each round's accuracy, latency
and kept layers go to build/quantization.json and the metrics, so what every fp32 layer
cost and bought is on record. validate later checks the result on held-out inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline import calibration, layer_paths, layout, programs, segments, shapes, task_metrics
from pipeline.accuracy import compare, failures, figures
from pipeline.errors import ConfigError
from pipeline.files import load_json, write_json
from pipeline.models import flat_outputs
from pipeline.quantize import QuantizeRequest, strip

REPORT = "quantization.json"


def build_int8(ctx, converted: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(engines.json entries, metrics) of the int8 (or fp8) build, after the accuracy-aware rounds."""
    cfg, target, q = ctx.config, ctx.target, ctx.config.quantize
    precision = cfg.compile.precision
    batches, digest = calibration.load_checked(cfg.calibration, cfg.input, cfg.data)
    batches = [b.to(target.trace_device()) for b in batches]  # where the lowered program lives (a GPU's)
    recipe = load_json(ctx.inputs["partition"] / layout.PARTITION.recipe, "partition recipe")
    gm = segments.fuse(target.graph_module(programs.load(ctx.inputs["lower"])), recipe)
    inputs = calibration.segment_inputs(gm, batches)
    cal = cfg.calibration
    dynamic = q.mode == "dynamic"  # ranges at run time: the batches only check
    ctx.console.print(f"calibration: {cal.source}, {len(batches)} batches, "
                      + ("quantize.mode=dynamic (activation scales per batch at run time; the batches check "
                         "accuracy)" if dynamic else f"method {cal.method}")
                      + f", per_channel={cal.per_channel}, sha256 {digest[:12]}", markup=False, highlight=False)
    evaluation = _evaluation(cfg, target, gm, batches)
    excluded, rounds, smooth = list(q.exclude), [], None
    check_excluded(target, converted, ctx.inputs["convert"], excluded)
    paths = layer_paths.of_segments(converted, ctx.inputs["convert"])  # names users wrote
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        def build(number: int, kept: list[str], alpha: float | None) -> list[dict[str, Any]]:
            with ctx.console.status(f"{precision} round {number}: quantizing and building with {target.name}"):
                return [target.build({**seg, "quantize": _request(seg["name"], inputs, cfg, kept, scratch, alpha)},
                                     ctx.inputs["convert"], ctx.out, cfg.compile) for seg in converted]

        for number in range(int(q.max_rounds) + 1):
            engines = build(number, excluded, smooth)
            record = {"round": number, "kept_fp32": list(excluded), "smooth_alpha": smooth,
                      **fractions(engines, precision)}
            if evaluation is not None:
                with ctx.console.status(f"{precision} round {number}: checking accuracy against fp32"):
                    record.update(evaluation.check(target, engines, ctx.out))
            rounds.append(record)
            ctx.console.print(_describe(record, precision), markup=False, highlight=False)
            if evaluation is None or record["passed"] or number == int(q.max_rounds):
                break
            if smooth is None and _smooths_next(q, engines, ctx, number + 1):
                smooth = float(q.smooth_alpha)
                continue
            worst = _worst_layers(engines, inputs, excluded, int(q.layers_per_round), ctx, Path(scratch), paths)
            if not worst:
                break
            excluded += worst
        best = max(rounds, key=lambda r: (bool(r.get("passed")), -(task_metrics.round_drop(r) or 0.0),
                                          r.get("cosine_similarity", 0.0)))
        if best is not rounds[-1]:  # no round passed and the last bought nothing: keep the best one's layers
            excluded, smooth = list(best["kept_fp32"]), best["smooth_alpha"]
            ctx.console.print(f"{precision}: no round passed; keeping round {best['round']}, the most accurate",
                              markup=False, highlight=False)
            engines = build(best["round"], excluded, smooth)
    engines = [strip(e) for e in engines]
    modules = {layer: layer_paths.module_of(layer, paths) for layer in excluded}
    report = {"calibration": OmegaConf.to_container(cal, resolve=True), "rounds": rounds, "kept_fp32": excluded,
              "kept_fp32_modules": modules, "chosen_round": best["round"], "smooth_alpha": smooth,
              "passed": best.get("passed"),
              "gate": dict(cfg.validate.tolerances[precision]) if evaluation else None}
    write_json(ctx.out / REPORT, report)
    # A text metric becomes an MLflow tag: the params are logged before the digest is known.
    return engines, {**_metrics(rounds, best, excluded, precision), "calibration.sha256": digest,
                     "quantize.kept_fp32_modules": ",".join(m or "?" for m in modules.values()) or "none"}


def _smooths_next(q, engines: list[dict[str, Any]], ctx, number: int) -> bool:
    """Whether round `number` smooths activation outliers into the weights, the first remedy where
    quantize.smooth_alpha is set and the engines come from ONNX models (pipeline.quantize.smooth)."""
    if q.smooth_alpha is None or not all("qdq_model" in e for e in engines):
        return False
    ctx.console.print(f"{ctx.config.compile.precision}: round {number} smooths the activations (SmoothQuant, "
                      f"alpha {float(q.smooth_alpha):g})", markup=False, highlight=False)
    return True


def _evaluation(cfg, target, gm, batches) -> Evaluation | None:
    """The rounds' accuracy check, where the target's engines can run here."""
    if target.can_execute() is not None:
        return None
    q, precision = cfg.quantize, cfg.compile.precision
    return Evaluation(gm, batches[: int(q.eval_samples)], dict(cfg.validate.tolerances[precision]),
                      cfg.model.task == "classification", int(q.latency_iterations),
                      shapes.batch_size(cfg.input, batches[0].dims), task_metrics.round_gate(cfg, int(q.eval_samples)))


def check_excluded(target, converted: list[dict[str, Any]], convert_dir: Path, excluded: list[str]) -> None:
    """quantize.exclude names layers that exist: `segment/layer` in that segment, a bare name in some segment.

    A misspelt name would otherwise quantize the layer it meant to keep, silently.
    """
    if not excluded:
        return
    found = {seg["name"]: target.layer_names(seg, convert_dir) for seg in converted}
    if any(names is None for names in found.values()):  # the target cannot tell: its tool checks
        return
    unknown = [e for e in excluded
               if ("/" in e and e.split("/", 1)[1] not in found.get(e.split("/", 1)[0], (set(), []))[0])
               or ("/" not in e and not any(e in names for names, _ in found.values()))]
    if unknown:
        hints = [f"{seg}/{layer}" for seg, (_, compute) in found.items() for layer in compute]
        raise ConfigError(f"quantize.exclude names {', '.join(unknown)}, which no segment has.",
                          f"name layers as segment/layer, e.g. {', '.join(hints[:6]) or 'none here'}"
                          f"{' ...' if len(hints) > 6 else ''} (build/engines.json and the QDQ models list them).")


def _request(name: str, inputs: dict[str, list[tuple]], cfg, excluded: list[str], scratch: str,
             smooth: float | None = None) -> QuantizeRequest:
    """The segment's request: layers excluded by bare name (every segment) or as segment/layer."""
    mine = [e.split("/", 1)[1] if "/" in e else e for e in excluded if "/" not in e or e.startswith(f"{name}/")]
    cal = cfg.calibration
    return QuantizeRequest(inputs=inputs.get(name, []), method=cal.method,
                           per_channel=bool(cal.per_channel), exclude=mine, op_types=list(cfg.quantize.op_types),
                           mode=cfg.quantize.mode, smooth_alpha=smooth, workdir=Path(scratch))


def fractions(engines: list[dict[str, Any]], precision: str) -> dict[str, Any]:
    """The shares of compute ops and MACs in `precision`, over every engine (their `precision` entries)."""
    stats = [e.get(precision) or {} for e in engines]
    ops = sum(s.get("compute_ops", 0) for s in stats)
    macs = sum(s.get("macs", 0) for s in stats)
    return {f"{precision}_op_fraction": sum(s.get(f"{precision}_ops", 0) for s in stats) / ops if ops else 0.0,
            f"{precision}_mac_fraction": sum(s.get(f"{precision}_macs", 0) for s in stats) / macs if macs else 0.0}


def _worst_layers(engines, inputs, excluded: list[str], count: int, ctx, scratch: Path,
                  paths: dict[str, str]) -> list[str]:
    """The `count` layers whose int8 versions add the most noise, over every segment, as segment/layer."""
    from pipeline.quantize import sensitivity

    if not all(("onnx" in e and "qdq_model" in e) or "quantized_program" in e or "torchao" in e for e in engines):
        ctx.console.print("int8: per-layer sensitivity reads QDQ ONNX models or PT2E programs, which these "
                          "engines do not have: no layer is moved to fp32", markup=False, highlight=False)
        return []
    found = []
    with ctx.console.status("int8: per-layer sensitivity against fp32"):
        for entry in engines:
            name, request = entry["name"], entry["quantize"]
            sample = request.inputs[: max(1, min(4, len(request.inputs)))]
            # A layer the quantizer left in float (ORT's dynamic route skips attention's two activation
            # products) adds no int8 noise of its own, whatever its SQNR says: keeping it buys nothing.
            floats = set((entry.get(ctx.config.compile.precision) or {}).get("fp32_layers", []))
            found += [(f"{name}/{layer}", db) for layer, db in _rank(entry, request, sample, ctx, scratch)
                      if layer not in floats]
    found.sort(key=lambda item: item[1])
    worst = [item for item in found if item[0] not in excluded and item[1] < sensitivity.EXACT_DB][:count]
    for layer, db in worst:
        ctx.console.print(f"int8: keeping {layer_paths.named(layer, paths)} in fp32 (it adds noise at "
                          f"SQNR {db:.1f} dB)",
                          markup=False, highlight=False)
    return [layer for layer, _ in worst]


def _rank(entry: dict[str, Any], request, sample: list[tuple], ctx, scratch: Path) -> list[tuple[str, float]]:
    """(layer, dB of the noise it adds) of one segment: QDQ ONNX model or PT2E program, worst first."""
    from pipeline.quantize import sensitivity

    if "torchao" in entry:  # torchao's linears on CUDA: each one's output against its bf16 weight's
        from pipeline.quantize import torchao_gpu

        spec = {**entry["torchao"], "exclude": list(request.exclude)}
        return torchao_gpu.rank(ctx.inputs["convert"] / entry["program"], spec, sample, entry["device"])
    if "quantized_program" in entry:  # PT2E: layers are module paths, kept by the quantizer's module filter
        from pipeline.quantize import pt2e, pt2e_sensitivity

        program = programs.load_program(ctx.out / entry["quantized_program"])
        return pt2e_sensitivity.rank(program, sample, pt2e.COMPUTE, request.exclude)
    from pipeline.quantize import ort_qdq

    pre = ort_qdq.float_model(ctx.inputs["convert"] / entry["onnx"], request, entry["name"])
    return sensitivity.rank(pre, ctx.out / entry["qdq_model"], sample, request.exclude, scratch)


def _describe(record: dict[str, Any], precision: str) -> str:
    text = (f"{precision} round {record['round']}: {record[f'{precision}_mac_fraction']:.1%} of MACs in {precision}, "
            f"{len(record['kept_fp32'])} layer(s) kept in fp32"
            + (f", activations smoothed (alpha {record['smooth_alpha']:g})" if record.get("smooth_alpha") else ""))
    if "cosine_similarity" in record:
        text += (f", cosine {record['cosine_similarity']:.5f}, rel L2 {record['rel_l2_err']:.3g}"
                 + (f", top-1 {record['top1_agreement']:.2f}" if "top1_agreement" in record else "")
                 + (f", task drop {task_metrics.round_drop(record):.2f} points"
                    if task_metrics.round_drop(record) is not None else "")
                 + (f", p50 {record['latency_p50_ms']:.2f} ms" if "latency_p50_ms" in record else "")
                 + (" (passes)" if record["passed"] else " (fails: " + "; ".join(record["failures"]) + ")"))
    return text


def _metrics(rounds: list[dict[str, Any]], last: dict[str, Any], excluded: list[str],
             precision: str) -> dict[str, Any]:
    fractions = (f"{precision}_op_fraction", f"{precision}_mac_fraction")
    metrics: dict[str, Any] = {**{k: last[k] for k in fractions},
                               "quantize_rounds": float(len(rounds) - 1), "quantize_layers_fp32": float(len(excluded)),
                               "quantize.kept_fp32": ",".join(excluded) or "none"}
    for record in rounds:
        for key in ("cosine_similarity", "rel_l2_err", "top1_agreement", "latency_p50_ms", fractions[1],
                    "task/top1_drop", "task/cosine_mean", "task/cosine_mean_drop", "smooth_alpha"):
            if record.get(key) is not None:
                metrics[f"quantize/round{record['round']}_{key}"] = record[key]
    return metrics


class Evaluation:
    """The fp32 program's outputs on a few batches, and the check of each round's engines against them."""

    def __init__(self, gm, batches, tolerance: dict[str, Any], classifier: bool, latency_iterations: int,
                 batch_size: int, task=None):
        import torch

        # task: a pipeline.task_metrics.RoundGate; with labels the task's drop gates, not the tolerances.
        self.gm, self.batches, self.tolerance, self.classifier, self.task = gm, batches, tolerance, classifier, task
        self.latency_iterations, self.batch_size = latency_iterations, batch_size
        with torch.no_grad():
            self.reference = [flat_outputs(b(gm)) for b in batches]

    def check(self, target, engines: list[dict[str, Any]], build_dir) -> dict[str, Any]:
        """Swap the segments for this round's engines, then accuracy (and latency) of the program."""
        import torch

        from pipeline.hybrid import EngineModule

        options = {**target.runtime_options(self.gm), "trusted": True}
        for entry in engines:
            setattr(self.gm, entry["name"], EngineModule(target.load_engine(entry, build_dir, options)))
        with torch.no_grad():
            got = [flat_outputs(b(self.gm)) for b in self.batches]
        acc = compare(self.reference, got, self.classifier)
        found = failures(acc, self.tolerance)
        record: dict[str, Any] = {**figures(acc), "passed": not found, "failures": found}
        if self.task is not None:
            task, found = self.task.check(self.reference, got)
            record.update({**task, "passed": not found, "failures": found})
        if self.latency_iterations:
            record["latency_p50_ms"] = self._latency()
        return record

    def _latency(self) -> float:
        import torch

        from pipeline.timing import measure

        sample = self.batches[0]

        def call():
            with torch.no_grad():
                sample(self.gm)

        stats = measure({"int8": call}, warmup=min(3, self.latency_iterations), iterations=self.latency_iterations,
                        rounds=1, min_seconds=0.0, batch_size=self.batch_size, cuda=False)
        return stats["int8"].p50_ms
