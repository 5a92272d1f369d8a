"""A sweep's runs in MLflow: the parent run, its children, and reading them back for a comparison.

The parent is created in the launching process with the store and the experiment (SQLite
stores race when many processes create them) and carries the launcher's host, pid and pid
start time, as a job's run does: if the launcher dies, or cannot reach the store when the
sweep ends, the next job or sweep that opens the store closes it FAILED (close_dead_runs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.tracking.recovery import close_dead_runs, preflight, process_identity


def start_parent(settings: dict[str, Any], sweep_id: str, params: dict[str, Any],
                 run_name: str | None = None) -> dict[str, str]:
    """Create the store, the experiment and the sweep's parent run (in the launching process)."""
    from mlflow.entities import Param

    from pipeline.tracking import (
        experiment_name,
        git_commit,
        make_client,
        open_experiment,
        tracking_uri,
        views,
    )

    preflight(tracking_uri(settings))  # one line now, not a traceback from MLflow
    client = make_client(settings)
    experiment_id = open_experiment(client, settings)
    try:
        close_dead_runs(client, experiment_id)  # parents and jobs of sweeps whose process died
    except Exception:  # tidying others' runs must never fail this sweep
        pass
    tags = {"sweep.id": sweep_id, "sweep.role": "parent", **process_identity()}
    commit = git_commit()
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    run = client.create_run(experiment_id, run_name=run_name or f"sweep {sweep_id}", tags=tags)
    views.save(client, experiment_id, views.sweep_key(sweep_id), views.sweep_state(sweep_id))
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri(settings),
            "experiment": experiment_name(settings)}


def finish_parent(settings: dict[str, Any], run_id: str, status: str, metrics: dict[str, float],
                  tags: dict[str, str], files: list[Path], note: str = "",
                  child_tags: dict[str, dict[str, str]] | None = None) -> None:
    """The sweep's winner on its parent (best/ metrics, best.* tags, the comparison as its description)."""
    from mlflow.entities import Metric, RunTag

    from pipeline.tracking import make_client

    client = make_client(settings)
    now_ms = int(time.time() * 1000)
    if note:
        tags = {**tags, "mlflow.note.content": note}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now_ms, 0) for k, v in sorted(metrics.items())],
                     tags=[RunTag(k, str(v)[:5000] if k != "mlflow.note.content" else str(v)) for k, v in
                           sorted(tags.items())])
    for child, values in (child_tags or {}).items():
        values = dict(values)
        if "mlflow.runName" in values:  # a tag alone would leave the run's name (its own column) as it was
            client.update_run(child, name=values.pop("mlflow.runName"))
        client.log_batch(child, tags=[RunTag(k, v) for k, v in sorted(values.items())])
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=status)


def close_orphans(settings: dict[str, Any], sweep_id: str, reason: str) -> list[str]:
    """Children of the sweep still RUNNING after the sweep ended: their worker died. Mark them FAILED."""
    from mlflow.entities import RunTag

    from pipeline.tracking import make_client

    client = make_client(settings)
    closed = []
    for run in search(client, settings, f"tags.`sweep.id` = '{sweep_id}' and attributes.status = 'RUNNING'"):
        if run.data.tags.get("sweep.role") == "parent":
            continue
        client.log_batch(run.info.run_id, tags=[RunTag("error", reason), RunTag("status", "FAILED")])
        client.set_terminated(run.info.run_id, status="FAILED")
        closed.append(run.info.run_id)
    return closed


def search(client, settings: dict[str, Any], filter_string: str, experiment: str | None = None) -> list:
    from pipeline.tracking import experiment_name

    exp = client.get_experiment_by_name(experiment or experiment_name(settings))
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token, order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def job_record(run) -> dict[str, Any]:
    """An MLflow run as the comparison reads it (the same shape sweep.disk_records gives from run.json)."""
    tags = run.data.tags
    job = tags.get("sweep.job")
    return {"job": int(job) if job is not None and job.isdigit() else None,
            "name": run.info.run_name, "run_id": run.info.run_id,
            "overrides": tags.get("sweep.overrides", ""), "target": tags.get("target", ""),
            "status": run.info.status, "error": tags.get("error"), "metrics": dict(run.data.metrics),
            "tags": dict(tags)}


def load_jobs(settings: dict[str, Any], sweep_id: str | None = None,
              experiment: str | None = None) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(parent record or None, job records): a sweep by id, the latest sweep ('latest'), or every run."""
    from pipeline.tracking import make_client

    client = make_client(settings)
    if sweep_id == "latest":
        parents = search(client, settings, "tags.`sweep.role` = 'parent'", experiment)
        if not parents:
            return None, []
        sweep_id = parents[-1].data.tags["sweep.id"]
    if sweep_id is None:
        runs = search(client, settings, "", experiment)
        return None, [job_record(r) for r in runs if r.data.tags.get("sweep.role") != "parent"]
    runs = search(client, settings, f"tags.`sweep.id` = '{sweep_id}'", experiment)
    parent = next((job_record(r) for r in runs if r.data.tags.get("sweep.role") == "parent"), None)
    jobs = sorted((job_record(r) for r in runs if r.data.tags.get("sweep.role") != "parent"),
                  key=lambda j: (j["job"] is None, j["job"] or 0))
    return parent, jobs
