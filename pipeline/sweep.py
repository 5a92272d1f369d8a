"""Sweeps (`python -m pipeline -m ...`): one parent MLflow run, a child per job, a comparison at the end.

Hydra calls SweepCallback in the launching process. It creates the store, experiment and
parent run before any worker starts (parallel workers creating a SQLite store at once
race) and writes `<sweep dir>/sweep.json`, which each job finds from its own folder:
that works for every launcher (basic, joblib, submitit, ray) that shares a file system.

Failure isolation does not rely on Hydra: in a grid sweep a failed job returns NaN
instead of raising (Hydra would re-raise the first failure after the batch and skip
on_multirun_end). In an Optuna search a failed trial raises, which the Optuna sweeper
records as a failed trial and, with max_failure_rate=1, goes on. The end of the
sweep reads every job's run.json, so a worker that died is still a row; `finalize` runs
from on_multirun_end or, if Hydra itself failed, from the entry point.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from pipeline import layout
from pipeline.files import load_json, write_json

SWEEP_FILE = "sweep.json"
# The sweep started in this process, for the entry point's exit status and late finalize.
STATE: dict[str, Any] = {}


def _settings(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config.tracking, resolve=True)




class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from rich.console import Console

        from pipeline import tracking

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        overrides = list(config.hydra.overrides.task)
        info: dict[str, Any] = {"id": sweep_id, "dir": str(sweep_dir), "started": time.time(),
                                "overrides": overrides, "autotune": is_search(config.hydra), "parent": None}
        if config.tracking.enabled:
            params = {"sweep.overrides": " ".join(overrides),
                      "sweep.sweeper": OmegaConf.select(config, "hydra.sweeper._target_", default=""),
                      "sweep.launcher": OmegaConf.select(config, "hydra.launcher._target_", default="")}
            info["parent"] = tracking.start_parent(_settings(config), sweep_id, params)
        write_json(sweep_dir / SWEEP_FILE, info)
        STATE.clear()
        STATE.update(info=info, config=config, finalized=False)
        Console(highlight=False).print(f"[bold]sweep[/] {sweep_id}: jobs in " + escape(str(sweep_dir))
                                       + (f", MLflow parent run {info['parent']['run_id']}" if info["parent"] else ""))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finalize()


def job_context(run_dir: Path) -> dict[str, Any] | None:
    """The sweep a job belongs to (from sweep.json above its folder) with its number and overrides."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    for folder in (run_dir, *run_dir.parents[:3]):
        if (folder / SWEEP_FILE).is_file():
            info = load_json(folder / SWEEP_FILE, "sweep description")
            return {"id": info["id"], "parent": info.get("parent"), "job": int(hc.job.num),
                    "overrides": " ".join(hc.overrides.task)}
    return None


def failed_value() -> float:
    """What a failed job of a grid sweep returns (Hydra's basic sweeper ignores it; NaN is no latency)."""
    return math.nan


def is_search(hydra_cfg=None) -> bool:
    """Whether the sweep (this job's, by default) is an Optuna search, whose failed trials must raise."""
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    return "optuna" in str(OmegaConf.select(hydra_cfg, "sweeper._target_", default=""))


def disk_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job folder: its run.json, or a FAILED row when the job's process died before finishing it."""
    import yaml

    records = []
    for folder in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = folder / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        record = {"job": int(folder.name), "name": folder.name, "overrides": " ".join(overrides or []),
                  "target": "", "status": "FAILED", "metrics": {}, "tags": {}, "run_dir": str(folder),
                  "error": "the job's worker stopped before it recorded a result (killed, or out of memory)"}
        run = load_json(folder / layout.RUN_JSON, "run record") if (folder / layout.RUN_JSON).is_file() else {}
        if run.get("status", "RUNNING") != "RUNNING":  # still RUNNING after the sweep: its process died
            record.update(target=run.get("target") or "", status=run["status"], error=run.get("error"),
                          metrics=run.get("metrics", {}), tags=run.get("tags", {}),
                          run_id=(run.get("tracking") or {}).get("run_id"))
        records.append(record)
    return records


def best_job(jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest job that finished, was measured and passed its accuracy check."""
    ok = [j for j in jobs if j["status"] == "FINISHED" and j["metrics"].get("validated")
          and j["metrics"].get("accuracy_passed", 0) and "latency_p50_ms" in j["metrics"]]
    return min(ok, key=lambda j: j["metrics"]["latency_p50_ms"]) if ok else None


def finalize() -> int:
    """Summarise the sweep started in this process once: table, report, parent run. Failed job count."""
    if not STATE or STATE.get("finalized"):
        return STATE.get("failed", 0)
    from rich.console import Console

    from pipeline import compare, tracking

    STATE["finalized"] = True
    info, config = STATE["info"], STATE["config"]
    sweep_dir = Path(info["dir"])
    # A sweep's table is wide: give it room also when the output goes to a file or a pipe.
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 180)
    if info["parent"]:
        orphans = tracking.close_orphans(_settings(config), info["id"],
                                         "the job's worker stopped before it recorded a result")
        if orphans:
            console.print(f"[yellow]warning:[/] {len(orphans)} job run(s) left RUNNING by a dead worker, marked FAILED")
    jobs = disk_records(sweep_dir)
    failed = [j for j in jobs if j["status"] != "FINISHED"]
    title = f"sweep {info['id']}: {len(jobs)} jobs, {len(failed)} failed"
    console.print(compare.table(jobs, title))
    files = compare.write_report(jobs, sweep_dir / "compare", title)
    best = best_job(jobs)
    differs = dict(zip((id(j) for j in jobs), compare.varying_overrides(jobs), strict=True))
    tags = {"jobs.total": str(len(jobs)), "jobs.failed": str(len(failed))}
    if best:
        tags.update({"best.job": str(best["job"]), "best.overrides": best["overrides"]})
        console.print(f"[bold]best[/]: job {best['job']} ({escape(differs[id(best)] or best['overrides'])}): "
                      f"p50 {best['metrics']['latency_p50_ms']:.3f} ms, speedup {best['metrics'].get('speedup', 0):.2f}x")
    optuna = sweep_dir / "optimization_results.yaml"
    if optuna.is_file():
        results = OmegaConf.load(optuna)
        tags["best.params"] = " ".join(f"{k}={v}" for k, v in results.get("best_params", {}).items())
        console.print(f"[bold]autotune best[/]: {escape(tags['best.params'])} (p50 {results.get('best_value')} ms)")
    for job in failed:
        console.print(f"[red]failed[/] job {job['job']} ({escape(differs[id(job)])}): {escape(str(job['error']))}")
    console.print("report: " + escape(str(sweep_dir / "compare")))
    if info["parent"]:
        metrics = {"jobs_total": len(jobs), "jobs_failed": len(failed)}
        if best:
            metrics["best_latency_p50_ms"] = best["metrics"]["latency_p50_ms"]
        status = "FAILED" if failed and not info["autotune"] else "FINISHED"
        tracking.finish_parent(_settings(config), info["parent"]["run_id"], status, metrics, tags, files)
        console.print(f"mlflow: parent run {info['parent']['run_id']} in experiment "
                      + escape(repr(info["parent"]["experiment"])))
    write_json(sweep_dir / SWEEP_FILE, {**info, "finished": time.time(), "jobs": len(jobs), "failed": len(failed)})
    # An autotune search expects failed trials; it fails only when nothing worked.
    STATE["failed"] = (len(jobs) if best is None else 0) if info["autotune"] else len(failed)
    return STATE["failed"]
