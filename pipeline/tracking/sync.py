"""Results on disk sent to MLflow afterwards: `python -m pipeline.tracking sync FOLDER...`.

A job whose store went away (a server killed, a SQLite file deleted or made read-only)
keeps its results in its run folder and exits 4; a sweep that lost its store leaves its
parent run RUNNING. Once the store is back, one command sends what is missing. A folder
may be a single run, one job of a sweep, a whole sweep (its parent included) or any
folder above them: run folders are found by their run.json wherever they are, without
descending into stores, artifact copies or the stage cache.

Its own module above the package (it uses the Tracker), so that pipeline.tracking's
recovery helpers, which the Tracker imports, never import the Tracker back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline import layout
from pipeline.errors import ArtifactError
from pipeline.tracking.recovery import NOT_RUNS

SWEEP_FILE = "sweep.json"


def discover(root: Path) -> tuple[list[Path], list[Path]]:
    """(sweep folders, run folders outside those sweeps) at or under `root`."""
    sweeps: list[Path] = []
    runs: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        if SWEEP_FILE in files:
            sweeps.append(here)
            subfolders.clear()  # its jobs are synced with it
        elif layout.RUN_JSON in files:
            runs.append(here)
            subfolders.clear()  # stage folders hold no runs
        else:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in NOT_RUNS)
    return sweeps, runs


def run_config(run_dir: Path) -> dict[str, Any]:
    """The job's resolved config: config.yaml, or Hydra's copy when the job failed before writing it."""
    from omegaconf import OmegaConf

    for path in (run_dir / layout.RUN_CONFIG, run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            except Exception as err:  # an interpolation only Hydra can resolve, a damaged file
                raise ArtifactError(f"{path} cannot be read ({type(err).__name__}: {err}).".splitlines()[0],
                                    "sync the run from a folder holding its config.yaml.") from None
    raise ArtifactError(f"{run_dir} has a {layout.RUN_JSON} but no {layout.RUN_CONFIG} (nor .hydra/config.yaml).",
                        "pass the run folder the job wrote (it holds both files).")


def recorded_result(run_dir: Path) -> Any:
    """A run folder's run.json as the object Tracker.finish logs."""
    import json
    from types import SimpleNamespace

    try:
        data = json.loads((run_dir / layout.RUN_JSON).read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{run_dir / layout.RUN_JSON} cannot be read ({err}).",
                            "pass a run folder whose job ended (its run.json is whole).") from None
    stages = [SimpleNamespace(**{"seconds": 0.0, "hit": False, "metrics": {}, "notes": [], **s}) for s in data.get("stages", [])]
    return SimpleNamespace(status=data.get("status") or "FAILED", error=data.get("error"), stages=stages,
                           metrics=data.get("metrics") or {}, tags=data.get("tags") or {},
                           target=data.get("target") or "", target_reason=data.get("target_reason") or "",
                           raw=data)


def sync_run(run_dir: Path, tags: dict[str, str] | None = None,
             settings: dict[str, Any] | None = None) -> dict[str, str]:
    """Send a run folder's results (run.json, config, artifacts) to MLflow and close its run.

    Reuses the run the job opened when the store has it (a server that died mid-run),
    else creates one with `tags` (a sweep job's link to its parent); the run folder's
    run.json then says it is recorded. A job still RUNNING on disk is recorded FAILED.
    """
    from mlflow.entities import Param

    from pipeline.files import write_json
    from pipeline.naming import params
    from pipeline.tracking import Tracker, make_client, open_experiment, tracking_uri
    from pipeline.tracking.recovery import preflight

    result = recorded_result(run_dir)
    if result.status == "RUNNING":
        result.status, result.error = "FAILED", result.error or "the job ended without recording a result"
    config = run_config(run_dir)
    tracker = Tracker({**(settings or config["tracking"]), "enabled": True})
    preflight(tracking_uri(tracker.settings))
    tracker.client = make_client(tracker.settings)
    tracker.experiment_id = open_experiment(tracker.client, tracker.settings)
    run_id = (result.raw.get("tracking") or {}).get("run_id")
    if run_id is None or _missing(tracker.client, run_id):
        name = (result.raw.get("tracking") or {}).get("run_name") or f"{config['model']['name']}-{result.raw.get('target')}"
        run_tags = {"run_dir": str(run_dir.resolve()), "synced": "true", "model": config["model"]["name"],
                    "target": str(result.raw.get("target") or config["target"].get("name", "")), **(tags or {})}
        run_id = tracker.client.create_run(tracker.experiment_id, run_name=name, tags=run_tags).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params(config).items())]
        for i in range(0, len(items), 100):
            tracker.client.log_batch(run_id, params=items[i:i + 100])
    tracker.run_id = run_id
    tracking = tracker._record(result, run_dir)
    write_json(run_dir / layout.RUN_JSON, {**result.raw, "status": result.status, "error": result.error,
                                          "tracking": {**(result.raw.get("tracking") or {}), **tracking,
                                                       "recorded": True}})
    return tracking


def _missing(client, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return False
    except Exception:  # MLflow raises its own error types for an unknown id
        return True


def job_tags(run_dir: Path, info: dict[str, Any]) -> dict[str, str]:
    """A sweep job's tags (as the job sets them) from its folder and the sweep's sweep.json."""
    import yaml

    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    tags = {"sweep.id": str(info.get("id", "")), "sweep.job": run_dir.name, "sweep.overrides": " ".join(overrides or [])}
    if info.get("parent"):
        tags["mlflow.parentRunId"] = info["parent"]["run_id"]
    return tags


def sync_sweep(sweep_dir: Path, say) -> int:
    """Every job of a sweep that MLflow lacks, then the parent closed with the comparison. Jobs sent.

    The parent is reused where the store has it, else created (a SQLite store deleted and
    made anew), and sweep.json then names it; jobs created anew are linked to it.
    """
    from pipeline import compare, sweep
    from pipeline.files import load_json, write_json
    from pipeline.tracking import make_client, open_experiment
    from pipeline.tracking.recovery import preflight
    from pipeline.tracking.sweeps import start_parent

    info = load_json(sweep_dir / SWEEP_FILE, "sweep description")
    folders = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    with_record = [f for f in folders if (f / layout.RUN_JSON).is_file()]
    settings = info.get("tracking") or (run_config(with_record[0])["tracking"] if with_record else None)
    if settings is None:
        raise ArtifactError(f"{sweep_dir} has no job that wrote a {layout.RUN_JSON}: nothing to send.")
    settings = {**settings, "enabled": True}
    from pipeline.tracking import tracking_uri

    preflight(tracking_uri(settings))
    client = make_client(settings)
    open_experiment(client, settings)
    parent = info.get("parent")
    if parent is None or _missing(client, parent["run_id"]):
        params = {"sweep.overrides": " ".join(info.get("overrides", []))}
        parent = start_parent(settings, info["id"], params, f"sweep {info['id']} (synced)")
        info = {**info, "parent": parent}
        write_json(sweep_dir / SWEEP_FILE, info)
    sent = 0
    for folder in with_record:
        tracked = load_json(folder / layout.RUN_JSON, "run record").get("tracking") or {}
        if tracked.get("recorded") and not _missing(client, tracked.get("run_id") or ""):
            continue  # in the store already (a store deleted since has lost it: sent again)
        sync_run(folder, tags=job_tags(folder, info), settings=settings)
        say(f"synced job {folder.name} ({folder})")
        sent += 1
    jobs = sweep.disk_records(sweep_dir)
    title = f"sweep {info['id']}: {len(jobs)} jobs, {sum(j['status'] != 'FINISHED' for j in jobs)} failed"
    files = compare.write_report(jobs, sweep_dir / "compare", title)
    summary = sweep.summarise(jobs, sweep.best_job(jobs), sweep_dir)
    sweep.record_parent(settings, {**info, "autotune": info.get("autotune", False)}, jobs, summary, files, title)
    write_json(sweep_dir / SWEEP_FILE, {**info, "unsynced": []})
    return sent
