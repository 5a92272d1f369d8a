"""Benchmark (not a test): int8 against fp32 engines of the pipeline, on this machine's CPU.

For ResNet-50 (batch 1) and BERT-base (input=text_dynamic, at its opt size), the pipeline
builds an fp32 and an int8 engine per target (`python -m pipeline ... compile.precision=`):
onnxruntime (static QDQ per segment) and inductor (PT2E with X86InductorQuantizer, an
AOTInductor package; ResNet-50 only by default, `--targets` picks);
both are loaded with `pipeline.load`, timed interleaved in one process on one harness, and
compared on held-out inputs (a seed used neither for calibration nor for validation):
cosine similarity, relative L2 error and top-1 agreement of each engine against eager
fp32 PyTorch, next to the speed. Goal: ResNet-50 int8 >= 2.5x its fp32 engine, cosine
>= 0.999 and top-1 agreement >= 99%.

The digits CNN (pipeline/digits.py: trained here on scikit-learn's bundled digits, no
download) is a trained model with real held-out data: its rows add the task figures the
pipeline measured on that split (top-1 of the engine, its drop in points against eager
fp32; int8 calibrated on the data's calibration split, gated by validate.max_drop=1).

    make bench-quant      # or: .venv/bin/python bench/quant.py [--iterations N] [--samples N] [--models resnet50]
                          #     [--targets onnxruntime inductor]

Builds go to outputs/bench-quant/ (its own stage cache: a second run only times).

    make bench-quant-gpu  # or: bench/quant.py --gpu: fp8 vs fp16 Inductor engines on a CUDA GPU (bench/quant_gpu.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# BENCH_QUANT_DIR moves the builds (and the digits CNN's weights and data) elsewhere.
WORK = Path(os.environ.get("BENCH_QUANT_DIR") or ROOT / "outputs" / "bench-quant")
DIGITS = WORK / "digits"
MODELS = {"resnet50": ("model=resnet50", "input=image_224"),
          "bert_base": ("model=bert_base", "input=text_dynamic", "quantize=transformer"),
          "digits_cnn": ("model=digits_cnn", f"model.weights={DIGITS / 'weights.safetensors'}", "input=digits",
                         "data=digits", f"data.path={DIGITS / 'x.npy'}", f"data.labels={DIGITS / 'y.npy'}",
                         "validate.max_drop=1")}
# Which targets build which models by default (inductor's AOTInductor builds of BERT take long on 2 cores).
TARGETS = {"onnxruntime": tuple(MODELS), "inductor": ("resnet50", "digits_cnn")}
# Held-out inputs: calibration draws with calibration.seed (1234), validation with offsets 1, 1001, ...
HELD_OUT_SEED = 77_777


def build(model: str, target: str, precision: str) -> tuple[Path, str]:
    """The run folder of one pipeline job, and how it ended (a failed gate still leaves engines)."""
    run_dir = WORK / "runs" / f"{model}-{target}-{precision}"
    if model == "digits_cnn" and not (DIGITS / "weights.safetensors").is_file():
        from pipeline.digits import train

        train(DIGITS)
    data = ("calibration=data",) if model == "digits_cnn" and precision == "int8" else ()
    cmd = [sys.executable, "-m", "pipeline", *MODELS[model], *data, f"target={target}", f"compile.precision={precision}",
           "validate=quick", "tracking.enabled=false", f"paths.outputs={WORK}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("int8 round", "int8: keeping", "error:"))]
    if not (run_dir / "build" / "engines.json").is_file():
        raise RuntimeError(f"{model} {target} {precision}: the build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return run_dir, " | ".join(lines) or "ok"


def accuracy(reference: list, got: list, classifier: bool) -> dict[str, float]:
    import torch

    r = torch.cat([t.double().flatten() for t in reference])
    g = torch.cat([t.double().flatten() for t in got])
    out = {"cosine": float(torch.nn.functional.cosine_similarity(g, r, dim=0)),
           "rel_l2": float((g - r).norm() / r.norm())}
    if classifier:
        out["top1"] = float(torch.cat([(a.argmax(-1) == b.argmax(-1)).float()
                                       for a, b in zip(reference, got, strict=True)]).mean())
    return out


def compare(runs: dict[str, Path], iterations: int, samples: int) -> dict:
    """Both engines against eager fp32 on held-out inputs, then their latency interleaved."""
    import torch
    from omegaconf import OmegaConf

    import pipeline
    from pipeline import shapes
    from pipeline.models import build_model, flat_outputs
    from pipeline.timing import measure

    cfg = OmegaConf.load(runs["fp32"] / "config.yaml")
    eager = build_model(cfg.model)
    engines = {p: pipeline.load(d, trusted=True) for p, d in runs.items()}  # built here by this script
    dims = shapes.corners(cfg.input)["opt"]
    held_out = shapes.make(cfg.input, dims, samples, seed_offset=HELD_OUT_SEED)
    classifier = cfg.model.task == "classification"
    result: dict = {"inputs": shapes.label(dims), "held_out_samples": samples}
    with torch.no_grad():
        ref = [flat_outputs(b(eager))[0] for b in held_out]
        for precision, module in engines.items():
            got = [flat_outputs(b(module))[0] for b in held_out]
            result[precision] = {"accuracy_vs_eager_fp32": accuracy(ref, got, classifier)}

    sample = held_out[0]

    def call(module):
        def fn():
            with torch.no_grad():
                sample(module)
        return fn

    stats = measure({p: call(m) for p, m in engines.items()}, warmup=5, iterations=iterations,
                    rounds=max(1, iterations // 10), min_seconds=0.0,
                    batch_size=shapes.batch_size(cfg.input, dims), cuda=False)
    for precision, st in stats.items():
        result[precision]["latency"] = st.as_dict()
    result["speedup_int8_vs_fp32"] = stats["fp32"].p50_ms / stats["int8"].p50_ms
    for precision, run_dir in runs.items():  # the task figures the pipeline measured on held-out real data
        task = json.loads((run_dir / "validate" / "report.json").read_text()).get("task")
        if task and task.get("primary") == "top1":
            result[precision]["task"] = {"top1": task["engine"]["top1"], "drop": task["drop"]["top1"],
                                         "eager_top1": task["eager"]["top1"], "samples": task["samples"]}
    return result


def report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    table = Table(title="int8 vs fp32 engines (pipeline.load), each pair interleaved in one process")
    for col in ("model", "target", "engine", "p50 ms", "p90 ms", "cv", "cosine", "rel L2", "top-1", "task top-1",
                "drop", "speedup"):
        table.add_column(col, justify="left" if col in ("model", "target", "engine") else "right")
    for (model, target), r in results.items():
        for precision in ("fp32", "int8"):
            lat, acc = r[precision]["latency"], r[precision]["accuracy_vs_eager_fp32"]
            task = r[precision].get("task")
            table.add_row(model, target, precision, f"{lat['p50_ms']:.2f}", f"{lat['p90_ms']:.2f}", f"{lat['cv']:.1%}",
                          f"{acc['cosine']:.6f}", f"{acc['rel_l2']:.4f}",
                          f"{acc['top1']:.1%}" if "top1" in acc else "-",
                          f"{task['top1']:.2f}%" if task else "-", f"{task['drop']:+.2f}" if task else "-",
                          f"{r['speedup_int8_vs_fp32']:.2f}x" if precision == "int8" else "")
    console.print(table)
    for (model, target), r in results.items():
        console.print(f"{model} {target} int8 build: {r['int8_build']}", markup=False, highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=None, choices=[*MODELS, "vit_b_16"],
                        help="models for every target (default: each target's models in TARGETS)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--gpu", action="store_true", help="fp8 vs fp16 Inductor engines on this CUDA GPU "
                        "(ViT-B/16 batch 64, BERT-base batch 32 seq 128): bench/quant_gpu.py")
    parser.add_argument("--out", type=Path, default=WORK / "gpu-results.json")
    args = parser.parse_args()
    if not args.gpu and "vit_b_16" in (args.models or []):
        parser.error("vit_b_16 is a --gpu model (fp8 vs fp16 on a CUDA GPU)")
    if args.gpu:
        sys.path.insert(0, str(ROOT / "bench"))
        import quant_gpu

        args.out.parent.mkdir(parents=True, exist_ok=True)
        sys.exit(1 if quant_gpu.run(args.iterations, args.out, args.models) else 0)
    results, failed = {}, {}
    pairs = [(m, t) for t in args.targets for m in (args.models or TARGETS[t])]
    for model, target in pairs:
        runs, notes = {}, {}
        try:
            for precision in ("fp32", "int8"):
                runs[precision], notes[precision] = build(model, target, precision)
        except RuntimeError as err:  # one pair's failed build leaves the others' figures
            failed[(model, target)] = str(err)
            continue
        results[(model, target)] = {**compare(runs, args.iterations, args.samples), "int8_build": notes["int8"]}
        (WORK / "results.json").write_text(json.dumps({f"{m}/{t}": r for (m, t), r in results.items()}, indent=2))
    report(results)
    for error in failed.values():
        print(error)
    for (model, target), r in results.items():
        if model == "resnet50":
            acc = r["int8"]["accuracy_vs_eager_fp32"]
            ok = r["speedup_int8_vs_fp32"] >= 2.5 and acc["cosine"] >= 0.999 and acc.get("top1", 1.0) >= 0.99
            print(f"resnet50 {target} goal (int8 >= 2.5x fp32, cosine >= 0.999, top-1 >= 99%): "
                  f"{'OK' if ok else 'MISSED'}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
