"""GPU benchmark (not a test): ResNet-50, fp16, channels_last, on one CUDA GPU.

For each batch size:
1. Cold build. `python -m pipeline ... target=inductor target.mode=max-autotune
   target.memory_format=channels_last` in a subprocess with an empty stage cache and an
   empty Inductor/Triton cache: the build stage's compile time is the cold compile.
2. Warm start. The same command again in a fresh process, again with empty compiler
   caches but the stage cache of step 1 (every stage a hit): validate's
   engine_load_seconds is how long our engine took to be ready (load_cache_artifacts plus
   a compile that finds every kernel cached). Goal: under 10% of the cold compile.
3. Speed, in one process: eager (fp16, channels_last), our engine loaded with
   pipeline.load, and a hand-written torch.compile(mode="max-autotune") of the same model
   (compiled here, cold, and timed), interleaved with CUDA events on the current stream,
   medians of at least `--iterations` calls each. Goal: ours >= 0.95x the hand-written one.

4. Throughput search (`--throughput on|off|only`): one job on a dynamic batch 1..256
   (`input=image_dynamic_batch`, target=inductor in its default mode for dynamic shapes)
   with validate.throughput: throughput and p99 (host latency) per batch, and the batch
   with the most throughput under `--budget-ms` (10 ms).

    make bench-gpu        # or: python bench/gpu.py --batch 32 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pipeline_command(batch: int, work: Path, cache: Path, mode: str, tag: str) -> tuple[list[str], dict, Path]:
    """One pipeline job's command, in a fresh process with empty compiler caches of its own."""
    run_dir = work / f"run-{tag}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{tag}"),
           "TRITON_CACHE_DIR": str(work / f"triton-{tag}")}
    cmd = [sys.executable, "-m", "pipeline", "model=resnet50", "compile.precision=fp16", "target=inductor",
           f"target.mode={mode}", "target.memory_format=channels_last", "validate=quick",
           f"input.tensors=[{{name: x, shape: [{batch}, 3, 224, 224]}}]", "tracking.enabled=false",
           f"paths.outputs={work}", f"paths.cache={cache}", f"hydra.run.dir={run_dir}"]
    return cmd, env, run_dir


def figures(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, run_dir: Path, wall: float) -> dict:
    """A finished pipeline job's figures, from its run folder."""
    if proc.returncode != 0:
        sys.exit(f"pipeline run failed ({proc.returncode}):\n{out[-6000:]}")
    engines = json.loads((run_dir / "build" / "engines.json").read_text())
    report = json.loads((run_dir / "validate" / "report.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    return {"run_dir": str(run_dir), "wall_s": wall,
            "compile_s": sum(s.get("compile_seconds", 0) for s in engines["segments"]),
            "engine_load_s": report["engine_load_seconds"],
            "build_hit": next(s["hit"] for s in run["stages"] if s["name"] == "build"),
            "speedup_in_validate": report["latency"]["speedup"], "passed": report["passed"],
            "cosine": report["accuracy"]["cosine_similarity"]}


def speed(run_dir: Path, batch: int, mode: str, iterations: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    import pipeline
    from pipeline.models import build_model
    from pipeline.timing import measure

    cfg = OmegaConf.load(run_dir / "config.yaml")
    cl = torch.channels_last
    eager = build_model(cfg.model).half().cuda().to(memory_format=cl).eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).half().cuda()
    x = x.contiguous(memory_format=cl)
    hand = torch.compile(eager, mode=mode)
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            hand(x)
    torch.cuda.synchronize()
    hand_compile_s = time.perf_counter() - started
    started = time.perf_counter()  # after the hand-written compile, so it found no kernel of ours cached
    ours = pipeline.load(run_dir, trusted=True)  # our own run: its engines are our compiled code
    load_s = time.perf_counter() - started

    def call(module, step: bool):
        def fn():
            with torch.no_grad():
                if step:
                    torch.compiler.cudagraph_mark_step_begin()
                module(x)
        return fn

    with torch.no_grad():
        ref = eager(x).float()
        got = ours(x)
        got = (got[0] if isinstance(got, (tuple, list)) else got).float()
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0))
    stats = measure({"eager": call(eager, False), "ours": call(ours, False), "hand_torch_compile": call(hand, True)},
                    warmup=20, iterations=iterations, rounds=5, min_seconds=0.0, batch_size=batch, cuda=True)
    out = {k: v.as_dict() for k, v in stats.items()}
    return {"latency": out, "pipeline_load_s": load_s, "hand_compile_s": hand_compile_s, "cosine_vs_eager": cosine,
            "ours_vs_hand": out["hand_torch_compile"]["p50_ms"] / out["ours"]["p50_ms"],
            "ours_vs_eager": out["eager"]["p50_ms"] / out["ours"]["p50_ms"]}


PROFILE = """
import cProfile, pstats, sys, time
from pathlib import Path
import torch
import pipeline
torch.cuda.init()
profile = cProfile.Profile()
started = time.perf_counter()
profile.enable()
module = pipeline.load(Path(sys.argv[1]), trusted=True)
profile.disable()
print(f"pipeline.load: {time.perf_counter() - started:.2f} s (torch imported, CUDA initialised)")
from torch._dynamo.utils import compile_times, counters
print(compile_times(repr="str"))
print({k: dict(v) for k, v in counters.items() if v})
stats = pstats.Stats(profile).sort_stats("cumulative")
stats.print_stats(45)
stats.sort_stats("tottime").print_stats(25)
"""


def profile_load(run_dir: Path, work: Path) -> None:
    """Where a warm start's seconds go: pipeline.load under cProfile in a fresh process, empty compiler caches."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-profile"),
           "TRITON_CACHE_DIR": str(work / "triton-profile")}
    proc = subprocess.run([sys.executable, "-c", PROFILE, str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    print(proc.stdout[-20000:], proc.stderr[-3000:], flush=True)


def bench(batch: int, mode: str, iterations: int, root: Path, profile: bool = False) -> dict:
    """Cold build, warm rebuild (both subprocesses), then the speed of all three in this process."""
    work = root / f"bs{batch}"
    cache = work / "cache"
    runs = {}
    for tag in ("cold", "warm"):
        cmd, env, run_dir = pipeline_command(batch, work, cache, mode, tag)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        runs[tag] = figures(proc, proc.stdout + proc.stderr, run_dir, time.perf_counter() - started)
        print(f"bs{batch} {tag}: {json.dumps(runs[tag])}", flush=True)
    if profile:
        profile_load(Path(runs["warm"]["run_dir"]), work)
        return {"batch": batch, "mode": mode, **runs,
                "ready_fraction_of_cold": runs["warm"]["engine_load_s"] / runs["cold"]["compile_s"]}
    # The hand-written compile starts from empty compiler caches of its own.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-hand")
    os.environ["TRITON_CACHE_DIR"] = str(work / "triton-hand")
    measured = speed(Path(runs["warm"]["run_dir"]), batch, mode, iterations)
    return {"batch": batch, "mode": mode, **runs,
            "ready_fraction_of_cold": runs["warm"]["engine_load_s"] / runs["cold"]["compile_s"], **measured}


def throughput_table(root: Path, max_batch: int, budget_ms: float) -> dict:
    """ResNet-50 fp16 on a dynamic batch: the throughput curve and the chosen batch under the budget."""
    work = root / "throughput"
    cmd = [sys.executable, "-m", "pipeline", "model=resnet50", "compile.precision=fp16", "target=inductor",
           "target.memory_format=channels_last", "input=image_dynamic_batch", f"input.dims.batch.max={max_batch}",
           "validate=quick", "validate.throughput.enabled=true", f"validate.throughput.p99_budget_ms={budget_ms}",
           "tracking.enabled=false", f"paths.outputs={work}", f"hydra.run.dir={work / 'run'}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"throughput run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    report = json.loads((work / "run" / "validate" / "report.json").read_text())
    from pipeline.throughput import table

    print(f"\nResNet-50 fp16 channels_last, dynamic batch 1..{max_batch}, target=inductor "
          f"({time.perf_counter() - started:.0f} s with the build)\n{table(report['throughput'])}", flush=True)
    return report["throughput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--mode", default="max-autotune")
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (appended per batch size)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs and compiler caches")
    parser.add_argument("--profile-load", action="store_true",
                        help="after the cold and warm runs, profile pipeline.load instead of timing the engines")
    parser.add_argument("--throughput", choices=("on", "off", "only"), default="on",
                        help="the throughput search on a dynamic batch (only: nothing else)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--budget-ms", type=float, default=10.0, help="p99 budget of the throughput search")
    args = parser.parse_args()
    import torch

    card = torch.cuda.get_device_name(0)
    print(f"card: {card}; torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.work) as tmp:
        if args.throughput != "off":
            results.append({"card": card, "torch": torch.__version__,
                            "throughput": throughput_table(Path(tmp), args.max_batch, args.budget_ms)})
            if args.out:
                args.out.write_text(json.dumps(results, indent=2))
        for batch in args.batch if args.throughput != "only" else []:
            measured = bench(batch, args.mode, args.iterations, Path(tmp), args.profile_load)
            results.append({"card": card, "torch": torch.__version__, **measured})
            if args.out:
                args.out.write_text(json.dumps(results, indent=2))
            if not args.profile_load:
                print_table(results[-1])


def print_table(r: dict) -> None:
    lat = r["latency"]
    print(f"\nResNet-50 fp16 channels_last, batch {r['batch']}, {r['card']} (p50 ms over {lat['ours']['iterations']} calls)")
    for who in ("eager", "ours", "hand_torch_compile"):
        print(f"  {who:<20} {lat[who]['p50_ms']:8.3f} ms   p99 {lat[who]['p99_ms']:8.3f}   cv {lat[who]['cv']:.3f}")
    print(f"  ours vs hand-written torch.compile: {r['ours_vs_hand']:.3f}x   ours vs eager: {r['ours_vs_eager']:.2f}x")
    print(f"  cold compile (pipeline build) {r['cold']['compile_s']:.1f} s; hand-written compile {r['hand_compile_s']:.1f} s")
    print(f"  warm start (cache hit) engine ready in {r['warm']['engine_load_s']:.1f} s "
          f"= {r['ready_fraction_of_cold']:.1%} of cold; cosine vs eager {r['cosine_vs_eager']:.5f}", flush=True)


if __name__ == "__main__":
    main()
