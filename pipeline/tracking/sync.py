"""`python -m pipeline.tracking sync`: a run folder's results sent to MLflow after the job.

Its own module above the package (it uses the Tracker), so that pipeline.tracking's
recovery helpers, which the Tracker imports, never import the Tracker back.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.tracking import Tracker, make_client, open_experiment, tracking_uri
from pipeline.tracking.recovery import preflight, recorded_result


def sync(run_dir: Path) -> dict[str, str]:
    """Send a run folder's results (run.json, config.yaml, artifacts) to MLflow and close its run.

    Reuses the run the job opened when the store has it (a server that died mid-run),
    else creates one; the run folder's run.json then says it is recorded.
    """
    from omegaconf import OmegaConf

    from pipeline import layout
    from pipeline.files import write_json
    from pipeline.naming import params

    result = recorded_result(run_dir)
    config = OmegaConf.to_container(OmegaConf.load(run_dir / layout.RUN_CONFIG))
    tracker = Tracker({**config["tracking"], "enabled": True})
    preflight(tracking_uri(tracker.settings))
    tracker.client = make_client(tracker.settings)
    tracker.experiment_id = open_experiment(tracker.client, tracker.settings)
    run_id = (result.raw.get("tracking") or {}).get("run_id")
    if run_id is None or _missing(tracker.client, run_id):
        name = f"{config['model']['name']}-{result.raw.get('target')}"
        run = tracker.client.create_run(tracker.experiment_id, run_name=name,
                                        tags={"run_dir": str(run_dir.resolve()), "synced": "true"})
        run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params(config).items())]
        for i in range(0, len(items), 100):
            tracker.client.log_batch(run_id, params=items[i:i + 100])
    tracker.run_id = run_id
    tracking = tracker._record(result, run_dir)
    write_json(run_dir / layout.RUN_JSON, {**result.raw, "tracking": {**tracking, "recorded": True}})
    return tracking


def _missing(client, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return False
    except Exception:  # MLflow raises its own error types for an unknown id
        return True
