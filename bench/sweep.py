"""Benchmark (not a test): what a six-job sweep costs with the stage cache.

    .venv/bin/python bench/sweep.py            # or: make bench-sweep

ResNet-50 on this machine's CPU, compile.min_block_size=1,5,10 x target=onnxruntime,tensorrt
(TensorRT-RTX builds real engines without a GPU; they are not timed here). One cold
`python -m pipeline -m ...` in a subprocess with an empty cache and MLflow store.

The sweep's own work is one export and one lower (shared by every job through the cache)
plus each distinct partition/convert/build entry and each job's validate, all read from
the manifests. The requirement: sweep wall time <= 1.3 x that work, i.e. the sweep costs
little more than its builds; the rest is Python start-up, Hydra, MLflow, the summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import layout  # noqa: E402

SWEEP = ("model=resnet50", "compile.min_block_size=1,5,10", "target=onnxruntime,tensorrt")


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def measure(work: Path, extra: list[str]) -> dict:
    sweep_dir = work / "sweep"
    cmd = [sys.executable, "-m", "pipeline", "-m", *SWEEP, *extra, f"paths.outputs={work}",
           f"hydra.sweep.dir={sweep_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    seen: dict[str, float] = {}
    runs = {"export": 0, "lower": 0}
    rows = []
    for job in jobs:
        run = json.loads((job / "run.json").read_text())
        row = {"job": int(job.name), "target": run["target"], "status": run["status"]}
        for stage in layout.STAGES:
            m = manifest(job / stage)
            key = f"{stage}:{m['key']}"
            if stage in runs and key not in seen:
                runs[stage] += 1
            if key not in seen or stage == "validate":
                seen[key if stage != "validate" else f"{key}:{job.name}"] = m["wall_seconds"]
            record = next(s for s in run["stages"] if s["name"] == stage)
            row[stage] = "hit" if record["hit"] else f"{m['wall_seconds']:.1f}s"
        row["p50_ms"] = run["metrics"].get("latency_p50_ms")
        rows.append(row)
    work_s = sum(seen.values())
    return {"wall_s": wall, "work_s": work_s, "ratio": wall / work_s, "exports": runs["export"],
            "lowers": runs["lower"], "jobs": rows, "command": " ".join(cmd[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50, help="validate.iterations of each job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        result = measure(Path(tmp), [f"validate.iterations={args.iterations}"])
    print(f"machine: {platform.machine()}, {platform.python_version()}; sweep: {' '.join(SWEEP)}")
    print("| job | target | status | export | lower | partition | convert | build | validate | p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["jobs"]:
        p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] else "not measured"
        print(f"| {r['job']} | {r['target']} | {r['status']} | {r['export']} | {r['lower']} | {r['partition']} "
              f"| {r['convert']} | {r['build']} | {r['validate']} | {p50} |")
    print(f"\nexport ran {result['exports']}x, lower ran {result['lowers']}x")
    print(f"sweep wall {result['wall_s']:.1f} s; its own work {result['work_s']:.1f} s; "
          f"ratio {result['ratio']:.2f} (requirement <= 1.3)")
    if result["exports"] != 1 or result["lowers"] != 1 or result["ratio"] > 1.3:
        sys.exit("requirement not met")


if __name__ == "__main__":
    main()
