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

Cluster launchers lose jobs Hydra never hears of as failures: a job SLURM cancelled
(scancel, a dead node) or a Ray worker that died raises in the launching process while
the launcher collects results in job order, which would end the wait with later jobs
still running. `isolate_lost_jobs` makes such a job a failed result, so the launcher
waits for every other job (see its docstring for what it wraps).
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from pipeline import layout, naming
from pipeline.files import load_json, write_json

SWEEP_FILE = "sweep.json"
# The sweep started in this process, for the entry point's exit status and late finalize.
STATE: dict[str, Any] = {}


def _settings(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config.tracking, resolve=True)




class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from rich.console import Console

        from pipeline.tracking import sweeps

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        overrides = list(config.hydra.overrides.task)
        params_node = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        search = OmegaConf.to_container(params_node) if params_node is not None else {}
        swept = naming.swept_keys(overrides, search if is_search(config.hydra) else None)
        info: dict[str, Any] = {"id": sweep_id, "dir": str(sweep_dir), "started": time.time(),
                                "overrides": overrides, "swept": swept, "autotune": is_search(config.hydra),
                                "parent": None, "tracking": _settings(config)}
        if config.tracking.enabled:
            params = {"sweep.overrides": " ".join(overrides),
                      "sweep.sweeper": OmegaConf.select(config, "hydra.sweeper._target_", default=""),
                      "sweep.launcher": OmegaConf.select(config, "hydra.launcher._target_", default="")}
            name = naming.sweep_name(overrides, swept, search)
            info["parent"] = sweeps.start_parent(_settings(config), sweep_id, params, name)
        write_json(sweep_dir / SWEEP_FILE, info)
        STATE.clear()
        STATE.update(info=info, config=config, finalized=False)
        isolate_lost_jobs(str(OmegaConf.select(config, "hydra.launcher._target_", default="")))
        Console(highlight=False).print(f"[bold]sweep[/] {sweep_id}: jobs in " + escape(str(sweep_dir))
                                       + (f", MLflow parent run {info['parent']['run_id']}" if info["parent"] else ""))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finalize()


def isolate_lost_jobs(launcher: str) -> None:
    """A job the cluster lost is a failed result, not an exception that stops the launcher's wait.

    hydra-submitit-launcher returns `[job.results()[0] for job in jobs]`: results() raises
    for a job SLURM cancelled, and hydra-ray-launcher's `ray.get` raises for a worker that
    died. Wrapping those two calls (submitit's Job.results; the `ray` the Ray launcher's
    module calls) turns the loss into what a failed job returns (NaN, or a failure an
    Optuna search records), so the launcher goes on to the next job; the job's row comes
    from its run.json (KILLED after a SIGTERM it caught, else FAILED). Installed once per
    launching process, only for these launchers.
    """
    if "hydra_submitit_launcher" in launcher:
        from submitit.core import core

        if not getattr(core.Job.results, "pipeline_isolated", False):
            core.Job.results = _isolated(core.Job.results)
    elif "hydra_ray_launcher" in launcher:
        from hydra_plugins.hydra_ray_launcher import _core

        if not isinstance(_core.ray, _RayLostJobs):
            _core.ray = _RayLostJobs(_core.ray)


def _lost(error: BaseException, where: str):
    """What a lost job of the current sweep returns to the sweeper (a Hydra JobReturn), after one warning line."""
    from hydra.core.utils import JobReturn, JobStatus

    from pipeline.errors import typed_line

    print(f"warning: {where} ended without a result ({typed_line(error)}); the sweep goes on",
          file=sys.stderr, flush=True)
    if STATE.get("info", {}).get("autotune"):
        return JobReturn(status=JobStatus.FAILED, _return_value=error)
    return JobReturn(status=JobStatus.COMPLETED, _return_value=failed_value())


def _isolated(results):
    def wrapper(job):
        try:
            return results(job)
        except Exception as err:  # UncompletedJobError (cancelled, timed out), FailedJobError
            return [_lost(err, f"submitit job {job.job_id}")]

    wrapper.pipeline_isolated = True
    return wrapper


class _RayLostJobs:
    """The `ray` module as hydra-ray-launcher's _core sees it, with get() answering for dead workers."""

    def __init__(self, ray):
        self._ray = ray

    def __getattr__(self, name: str):
        return getattr(self._ray, name)

    def get(self, ref, *args, **kwargs):
        try:
            return self._ray.get(ref, *args, **kwargs)
        except self._ray.exceptions.RayError as err:  # WorkerCrashedError, TaskCancelledError, OOM, node died
            return _lost(err, f"Ray task {ref}")


def job_context(run_dir: Path) -> dict[str, Any] | None:
    """The sweep a job belongs to (from sweep.json above its folder) with its number and overrides."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    for folder in (run_dir, *run_dir.parents[:3]):
        if (folder / SWEEP_FILE).is_file():
            info = load_json(folder / SWEEP_FILE, "sweep description")
            return {"id": info["id"], "parent": info.get("parent"), "job": int(hc.job.num),
                    "overrides": " ".join(hc.overrides.task), "swept": info.get("swept", [])}
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
            build = next((st for st in run.get("stages", []) if st.get("name") == "build"), {})
            record.update(target=run.get("target") or "", status=run["status"], error=run.get("error"),
                          metrics=run.get("metrics", {}), tags=run.get("tags", {}), build_key=build.get("key"),
                          run_id=(run.get("tracking") or {}).get("run_id"),
                          run_name=(run.get("tracking") or {}).get("run_name"),
                          recorded=bool((run.get("tracking") or {}).get("recorded")))
        records.append(record)
    return records


def best_job(jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The winner (pipeline.ranking.winner): the fastest trusted job with an engine that passed its check."""
    from pipeline.ranking import winner

    return winner(jobs)[0]


def finalize() -> int:
    """Summarise the sweep started in this process once: table, report, parent run. Its exit status.

    The table comes from the jobs' run folders, so it is printed even when the store is
    gone. The status reflects every job: 1 if a job failed (in a search: if none worked),
    else 4 if results did not reach MLflow (a job's, or the parent's), as for one job.
    """
    if not STATE or STATE.get("finalized"):
        return STATE.get("exit", 0)
    from rich.console import Console

    from pipeline import compare

    STATE["finalized"] = True
    info, config = STATE["info"], STATE["config"]
    sweep_dir = Path(info["dir"])
    # Tables fit the terminal, and 120 columns when the output goes to a file or a pipe.
    console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120)
    lost = close_orphan_jobs(config, info, console)
    jobs = disk_records(sweep_dir)
    failed = [j for j in jobs if j["status"] != "FINISHED"]
    title = f"sweep {info['id']}: {len(jobs)} jobs, {len(failed)} failed"
    console.print(compare.table(jobs, title, console.width))
    files = compare.write_report(jobs, sweep_dir / "compare", title)
    best = best_job(jobs)
    summary = summarise(jobs, best, sweep_dir)
    for line in summary["lines"]:
        console.print(line)
    console.print("report: " + escape(str(sweep_dir / "compare")))
    if info["parent"] and lost is None:
        lost = tracking_step(lambda: record_parent(_settings(config), info, jobs, summary, files, title))
        if lost is None:
            print_parent(console, info["parent"], info["id"])
            if config.register and best:
                lost = tracking_step(lambda: register_best(config, best, console))
    unsynced = [j for j in jobs if j.get("recorded") is False] if info["parent"] else []
    if unsynced or lost:
        say_sync(console, sweep_dir, unsynced, lost, parent_open=lost is not None)
    write_json(sweep_dir / SWEEP_FILE, {**info, "finished": time.time(), "jobs": len(jobs), "failed": len(failed),
                                        "unsynced": [j["job"] for j in unsynced]})
    # An autotune search expects failed trials; it fails only when nothing worked.
    # A noisy machine may leave it without a named winner; that is no failure of the search.
    broken = not compare.candidates(jobs) if info["autotune"] else bool(failed)
    STATE["exit"] = 1 if broken else 4 if (unsynced or lost) else 0
    return STATE["exit"]


def tracking_step(step) -> str | None:
    """Run a step that talks to MLflow; its failure (the store gone) as one line, never a traceback."""
    from pipeline.errors import PipelineError, typed_line

    try:
        step()
        return None
    except PipelineError as err:
        return err.one_line()
    except Exception as err:  # MLflow's own errors: the store deleted, read-only, a server gone
        return typed_line(err)


def close_orphan_jobs(config: DictConfig, info: dict[str, Any], console) -> str | None:
    """Job runs of this sweep left RUNNING by a dead worker, marked FAILED; the store's error if it is gone."""
    from pipeline.tracking import sweeps

    if not info["parent"]:
        return None
    closed: list[str] = []
    lost = tracking_step(lambda: closed.extend(sweeps.close_orphans(
        _settings(config), info["id"], "the job's worker stopped before it recorded a result")))
    if closed:
        console.print(f"[yellow]warning:[/] {len(closed)} job run(s) left RUNNING by a dead worker, marked FAILED")
    return lost


def record_parent(settings: dict[str, Any], info: dict[str, Any], jobs: list[dict[str, Any]],
                  summary: dict[str, Any], files: list[Path], title: str) -> None:
    """Close the sweep's parent run with the comparison: at the end of the sweep, or by sync."""
    from pipeline import compare, tracking
    from pipeline.tracking import sweeps

    parent = info["parent"]
    failed = any(j["status"] != "FINISHED" for j in jobs)
    status = "FAILED" if failed and not info["autotune"] else "FINISHED"
    note = compare.note(jobs, title, lambda run_id: tracking.ui_path(parent["experiment_id"], run_id))
    sweeps.finish_parent(settings, parent["run_id"], status, summary["metrics"], summary["tags"], files,
                         note=note, child_tags=summary["child_tags"])


def print_parent(console, parent: dict[str, str], sweep_id: str) -> None:
    from pipeline import tracking

    console.print(f"mlflow: parent run {parent['run_id']} in experiment {parent['experiment']!r}", markup=False)
    view = tracking.views.sweep_key(sweep_id)  # the runs table in the sweep's saved view
    console.print(f"  runs table: {tracking.ui_link(parent['tracking_uri'], parent['experiment_id'], view=view)}",
                  markup=False)
    console.print("  the sweep:  "
                  + tracking.ui_link(parent["tracking_uri"], parent["experiment_id"], parent["run_id"]), markup=False)


def say_sync(console, sweep_dir: Path, unsynced: list[dict[str, Any]], error: str | None, parent_open: bool) -> None:
    """One line: which runs MLflow does not have, and the one command that sends them all."""
    what = []
    if unsynced:
        what.append(f"job(s) {', '.join(str(j['job']) for j in unsynced)}")
    if parent_open:
        what.append("the sweep's parent run")
    why = f" ({error})" if error else ""
    console.print(f"[yellow]warning:[/] MLflow does not have the results of {' and '.join(what)}{escape(why)}; "
                  "they are on disk. Once the store is back, send them with: "
                  + escape(f"python -m pipeline.tracking sync {sweep_dir}"), soft_wrap=True)


# The best job's figures copied onto the parent run, as best/<metric>.
BEST_METRICS = ("latency_p50_ms", "latency_p99_ms", "speedup", "throughput_per_s", "rel_l2_err",
                "cosine_similarity", "top1_agreement", "task/top1", "task/top1_drop", "task/cosine_mean",
                "quantize/speedup_vs_fp32", "quantize/speedup_vs_fp16")


def summarise(jobs: list[dict[str, Any]], best: dict[str, Any] | None, sweep_dir: Path) -> dict[str, Any]:
    """Lines to print, and the parent's metrics and tags, and each child's Pareto tag."""
    from pipeline import compare

    failed = [j for j in jobs if j["status"] != "FINISHED"]
    differs = dict(zip((id(j) for j in jobs), compare.varying_overrides(jobs), strict=True))
    front = {id(j) for j in compare.pareto_front(jobs)}
    metrics: dict[str, float] = {"jobs_total": len(jobs), "jobs_failed": len(failed)}
    tags = {"jobs.total": str(len(jobs)), "jobs.failed": str(len(failed))}
    lines: list[str] = []
    lines.append(("[bold]best[/]: " if best else "[yellow]no winner[/]: ")
                 + escape(compare.winner_line(jobs).split(": ", 1)[1]))
    if best:
        metrics.update({f"best/{k}": best["metrics"][k] for k in BEST_METRICS if k in best["metrics"]})
        tags.update({"best.job": str(best["job"]), "best.overrides": compare.shown_overrides(best["overrides"]),
                     "best.run_id": best.get("run_id") or "", "best.run_name": best.get("run_name") or ""})
        twins = [j for j in jobs if j is not best and j.get("build_key") and j.get("build_key") == best.get("build_key")]
        if twins:
            numbers = ", ".join(str(j["job"]) for j in twins)
            tags["best.same_engine_as"] = numbers
            lines.append(f"  job(s) {numbers} built the very same engine (build key {best['build_key'][:12]}): "
                         "one engine, measured once per job; the figures above are their median")
    else:
        tags["best.none"] = compare.winner(jobs)[1]
    optuna = sweep_dir / "optimization_results.yaml"
    if optuna.is_file():
        results = OmegaConf.load(optuna)
        tags["best.params"] = " ".join(f"{k}={v}" for k, v in results.get("best_params", {}).items())
        lines.append(f"[bold]autotune best[/]: {escape(tags['best.params'])} (p50 {results.get('best_value')} ms)")
    for job in failed:
        lines.append(f"[red]failed[/] job {job['job']} ({escape(differs[id(job)])}): {escape(str(job['error']))}")
    child_tags = {j["run_id"]: {"pareto": "true" if id(j) in front else "false",
                                "best": "true" if j is best else "false",
                                "reference": "true" if compare.is_reference(j) else "false",
                                **({"mlflow.runName": f"★ {j['run_name']}"} if j is best and j.get("run_name") else {})}
                  for j in jobs if j.get("run_id")}
    return {"lines": lines, "metrics": metrics, "tags": tags, "child_tags": child_tags}


def register_best(config: DictConfig, best: dict[str, Any], console) -> None:
    """register=true on a sweep: the best job's compiled program, registered with the alias `best`."""
    from pipeline.tracking import make_client, tracking_uri
    from pipeline.tracking.registry import register

    run_dir, settings = Path(best["run_dir"]), _settings(config)
    name = OmegaConf.load(run_dir / layout.RUN_CONFIG).model.name
    done = register(tracking_uri(settings), make_client(settings), run_dir, name, "best", best.get("run_id"))
    console.print(f"registered the best job: {escape(done['uri'])} (version {done['version']})")
