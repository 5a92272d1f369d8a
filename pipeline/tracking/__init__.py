"""MLflow tracking: the only module that imports mlflow.

The run is opened in a background thread while the first stages work, since importing
MLflow and opening its store cost seconds; it is always closed explicitly with the job's
real status (FINISHED, FAILED with the error as a tag, or KILLED). The default store is a
SQLite file under outputs/ with artifacts beside it; MLFLOW_TRACKING_URI and
MLFLOW_EXPERIMENT_NAME override both.

A sweep is one parent run, created with its store and experiment in the launching
process before any worker starts (SQLite stores race when many processes create them),
and one child run per job. Parallel jobs share one SQLite file, so every store call
retries while SQLite says the database is locked.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.errors import raise_deferred, typed_line
from pipeline.tracking import views
from pipeline.tracking.recovery import (
    TrackingError,
    close_dead_runs,
    preflight,
    process_identity,
)
from pipeline.tracking.store import open_sqlite, quiet_mlflow

# A sweep's runs are pipeline.tracking.sweeps, a module above this one (it uses make_client and
# open_experiment), so the package never imports it back.
__all__ = ["TrackingError", "Tracker", "make_client", "open_experiment", "tracking_uri", "ui_link", "ui_path",
           "views"]


def tracking_uri(settings: dict[str, Any]) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(settings['store']).resolve()}"


def experiment_name(settings: dict[str, Any]) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or settings["experiment"]


# Where `make ui` serves a local store.
LOCAL_UI = "http://127.0.0.1:5000"


def ui_path(experiment_id: str, run_id: str | None = None, view: str | None = None) -> str:
    """The UI's address of an experiment's runs table (or one run), relative to wherever it is served.

    `workflowType=machine_learning` is on both: without it MLflow 3 opens its GenAI pages
    (an "Evaluations" breadcrumb, a run page without the runs table's context) in a fresh browser.
    `view` opens the runs table in a saved view (pipeline.tracking.views).
    """
    if view and not run_id:
        return views.path(experiment_id, view)
    runs = f"#/experiments/{experiment_id}/runs"
    return f"{runs}/{run_id}?workflowType=machine_learning" if run_id else f"{runs}?workflowType=machine_learning"


def ui_link(uri: str, experiment_id: str, run_id: str | None = None, view: str | None = None) -> str:
    """The MLflow UI's runs table of an experiment (or one run), not its GenAI landing page."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/{ui_path(experiment_id, run_id, view)}"


def local_ui_link(settings: dict[str, Any]) -> str:
    """For `make ui`: the runs table of the configured experiment in the local store, if it exists yet."""
    client = make_client(settings)
    experiment = client.get_experiment_by_name(experiment_name(settings))
    if experiment is None:
        return f"{LOCAL_UI}/#/experiments"
    views.save(client, experiment.experiment_id, views.EXPERIMENT_VIEW, views.experiment_state())
    return ui_link(LOCAL_UI, experiment.experiment_id, view=views.EXPERIMENT_VIEW)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Statuses MLflow records for runs; a job's JobResult.status is one of them.
TERMINAL = ("FINISHED", "FAILED", "KILLED")


class RetryingClient:
    """An MlflowClient whose calls wait out SQLite's 'database is locked' from parallel writers."""

    def __init__(self, client, attempts: int = 12):
        self._client = client
        self._attempts = attempts

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            for attempt in range(self._attempts):
                raise_deferred()  # a signal while the job records itself stops it here, between calls
                try:
                    return method(*args, **kwargs)
                except Exception as err:
                    if "locked" not in str(err) or attempt == self._attempts - 1:
                        raise
                    time.sleep(min(0.05 * 2 ** attempt, 2.0) * (0.5 + random.random()))
            raise AssertionError("unreachable")

        return call


def make_client(settings: dict[str, Any]) -> RetryingClient:
    """A client whose store exists: a new SQLite store is created whole, under a file lock (tracking.store).

    HTTP retries are bounded so a dead server costs seconds, not minutes.
    """
    from mlflow.tracking import MlflowClient

    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(name, value)
    uri = tracking_uri(settings)
    if not uri.startswith("sqlite:///"):
        quiet_mlflow()
        return RetryingClient(MlflowClient(uri))
    return RetryingClient(open_sqlite(Path(uri.removeprefix("sqlite:///"))))


def open_experiment(client, settings: dict[str, Any]) -> str:
    """The experiment id, creating it (with artifacts under outputs/ for the local store)."""
    name = experiment_name(settings)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if views.VIEW_TAG + views.EXPERIMENT_VIEW not in experiment.tags:  # stores made before the view
            views.save(client, experiment.experiment_id, views.EXPERIMENT_VIEW, views.experiment_state())
        return experiment.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (Path(settings["artifacts"]).resolve() / name).as_uri()
    try:
        experiment_id = client.create_experiment(name, artifact_location=location)
        views.save(client, experiment_id, views.EXPERIMENT_VIEW, views.experiment_state())
        return experiment_id
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
        """Check the store in seconds, then open the run in the background while the stages work."""
        if not self.enabled:
            return
        preflight(tracking_uri(self.settings))
        tags = {**tags, **process_identity()}
        self._thread = threading.Thread(target=self._open, args=(run_name, params, tags), daemon=True)
        self._thread.start()

    def _open(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        try:
            from mlflow.entities import Param

            self.client = make_client(self.settings)
            self.experiment_id = open_experiment(self.client, self.settings)
            try:
                close_dead_runs(self.client, self.experiment_id)
            except Exception:  # tidying others' runs must never fail this job
                pass
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

    def opened(self, timeout: float | None = 0.0) -> str | None:
        """The run id once the run is open (None while opening, or if opening failed).

        The store answered the preflight, so a failure here is a store lost mid-run: the
        job goes on, its results land on disk, and finish() says how to send them (exit 4).
        """
        if not self.enabled:
            return None
        self._thread.join(timeout)
        return self.run_id if self._error is None else None

    def finish(self, result, run_dir: Path) -> dict[str, str]:
        """Log metrics, tags and artifacts, and close the run with the job's status."""
        if not self.enabled:
            return {}
        self.opened(timeout=None)
        try:
            if self._error is not None:
                raise self._error
            return self._record(result, run_dir)
        except Exception as err:  # the server went away, the disk filled up...
            raise TrackingError(
                f"the run's results are in {run_dir} but MLflow at {tracking_uri(self.settings)} did not take them "
                f"({typed_line(err)}).",
                f"once the store is back: python -m pipeline.tracking sync {run_dir}") from None

    def killed(self, result) -> None:
        """A signal while the run was being recorded: close it KILLED, best effort (the store may be slow)."""
        if not self.enabled or self.run_id is None or self.client is None:
            return
        from mlflow.entities import RunTag

        try:
            self.client.log_batch(self.run_id, tags=[RunTag("status", "KILLED"), RunTag("error", result.error or "")])
            self.client.set_terminated(self.run_id, status="KILLED")
        except Exception:  # the next job closes it (close_dead_runs), as for a SIGKILL
            pass

    def register(self, run_dir: Path, model_name: str, alias: str | None = None) -> dict[str, str]:
        from pipeline.tracking.registry import register

        try:
            return register(tracking_uri(self.settings), self.client or make_client(self.settings), run_dir,
                            model_name, alias, self.run_id)
        except Exception as err:  # MLflow's own errors, a store gone away
            raise TrackingError(f"the run finished but could not be registered as model {model_name!r} "
                                f"({typed_line(err)}).",
                                "check the tracking store, or run again with register=false.") from None

    def _record(self, result, run_dir: Path) -> dict[str, str]:
        from mlflow.entities import Metric, RunTag

        client = self.client
        now_ms = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now_ms, 0) for k, v in sorted(result.metrics.items())]
        metrics += curve_metrics(run_dir, now_ms)
        tags = [RunTag(f"cache.{s.name}", "hit" if s.hit else "miss") for s in result.stages]
        tags += [RunTag("target.reason", result.target_reason[:5000]), RunTag("status", result.status)]
        tags += [RunTag(k, str(v)[:5000]) for k, v in sorted(result.tags.items())]
        if "validated" in result.metrics:
            tags.append(RunTag("validated", "true" if result.metrics["validated"] else "false"))
        if result.error:
            tags.append(RunTag("error", result.error[:5000]))
        tags.append(RunTag("mlflow.note.content", views.run_description(result)))
        for i in range(0, max(len(metrics), 1), 1000):
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])
        if self.settings["log_artifacts"]:
            self._log_artifacts(run_dir, {s.name: s.key for s in result.stages})
        client.set_terminated(self.run_id, status=result.status)
        return {"tracking_uri": tracking_uri(self.settings), "experiment_id": self.experiment_id,
                "run_id": self.run_id, "experiment": experiment_name(self.settings)}

    def _log_artifacts(self, run_dir: Path, keys: dict[str, str]) -> None:
        from pipeline.tracking.artifacts import log_run

        log_run(self.client, self.experiment_id, self.run_id, run_dir, keys, self.settings.get("log_engines", True))


def curve_metrics(run_dir: Path, now_ms: int) -> list:
    """validate.throughput's curve as metrics with the batch as step: MLflow charts them against batch."""
    from mlflow.entities import Metric

    path = run_dir / "validate" / "report.json"
    found = json.loads(path.read_text()).get("throughput") if path.is_file() else None
    out = []
    for point in (found or {}).get("curve", []):
        out += [Metric(f"throughput_curve.{k}", float(point[k]), now_ms, int(point["batch"]))
                for k in ("throughput_per_s", "p99_ms", "p50_ms")]
    return out


def download_run(source: str, dst: Path, settings: dict[str, Any] | None = None) -> Path:
    """`runs:/<run_id>` as a local run folder (pipeline.load of an MLflow run)."""
    from pipeline.tracking.artifacts import download_run as fetch

    run_id = source.removeprefix("runs:/").strip("/").split("/")[0]
    settings = settings or {"store": "outputs/mlflow.db", "artifacts": "outputs/mlartifacts"}
    return fetch(make_client(settings), run_id, dst)
