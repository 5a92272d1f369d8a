"""MLflow tracking: the only module that imports mlflow.

The run is opened in a background thread while the first stages work, since importing
MLflow and opening its store cost seconds; it is always closed explicitly with the job's
real status (FINISHED, FAILED with the error as a tag, or KILLED). The default store is a
SQLite file under outputs/ with artifacts beside it; MLFLOW_TRACKING_URI and
MLFLOW_EXPERIMENT_NAME override both.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

# Run-folder files logged as artifacts: engines, reports, manifests, configs and the log.
ARTIFACTS = ("build/*", "*/manifest.json", "partition/*.json", "validate/report.json",
             "lower/ops.json", "export/model.json", "convert/segments.json", "config.yaml",
             "run.json", "console.log")


def tracking_uri(settings: dict[str, Any]) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(settings['store']).resolve()}"


def experiment_name(settings: dict[str, Any]) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or settings["experiment"]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def open_experiment(client, settings: dict[str, Any]) -> str:
    """The experiment id, creating it (with artifacts under outputs/ for the local store)."""
    name = experiment_name(settings)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (Path(settings["artifacts"]).resolve() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a parallel job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class Tracker:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.enabled = bool(settings["enabled"])
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._open, args=(run_name, params, tags), daemon=True)
        self._thread.start()

    def _open(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            uri = tracking_uri(self.settings)
            if uri.startswith("sqlite:///"):
                Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(uri)
            self.experiment_id = open_experiment(self.client, self.settings)
            commit = git_commit()
            if commit:
                tags = {**tags, "git_commit": commit, "mlflow.source.git.commit": commit}
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except BaseException as err:  # reported by finish(), in the main thread
            self._error = err

    def finish(self, result, run_dir: Path) -> dict[str, str]:
        """Log metrics, tags and artifacts, and close the run with the job's status."""
        if not self.enabled:
            return {}
        self._thread.join()
        if self._error is not None:
            raise PipelineError(f"could not open the MLflow run at {tracking_uri(self.settings)}: {self._error}",
                                "check MLFLOW_TRACKING_URI, or set tracking.enabled=false.")
        from mlflow.entities import Metric, RunTag

        client = self.client
        now_ms = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now_ms, 0) for k, v in sorted(result.metrics.items())]
        tags = [RunTag(f"cache.{s.name}", "hit" if s.hit else "miss") for s in result.stages]
        tags += [RunTag("target.reason", result.target_reason[:5000]), RunTag("status", result.status)]
        tags += [RunTag(k, str(v)[:5000]) for k, v in sorted(result.tags.items())]
        if "validated" in result.metrics:
            tags.append(RunTag("validated", "true" if result.metrics["validated"] else "false"))
        if result.error:
            tags.append(RunTag("error", result.error[:5000]))
        for i in range(0, max(len(metrics), 1), 1000):
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])
        if self.settings["log_artifacts"]:
            self._log_artifacts(run_dir)
        client.set_terminated(self.run_id, status=result.status)
        return {"tracking_uri": tracking_uri(self.settings), "experiment_id": self.experiment_id,
                "run_id": self.run_id, "experiment": experiment_name(self.settings)}

    def _log_artifacts(self, run_dir: Path) -> None:
        seen = set()
        for pattern in ARTIFACTS:
            for path in sorted(run_dir.glob(pattern)):
                if path.is_file() and path not in seen:
                    seen.add(path)
                    rel = path.relative_to(run_dir).parent.as_posix()
                    self.client.log_artifact(self.run_id, str(path), None if rel == "." else rel)
