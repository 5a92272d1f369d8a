"""When tracking meets the real world: stores that are down, runs whose process died, results to resend.

- `preflight` checks the store in seconds before any stage: a SQLite file whose folder
  cannot be written, or a server that does not answer (or refuses the credentials),
  is one line before an hour of building, not after it.
- `close_dead_runs`: a job records its host, pid and the pid's start time on its run;
  the next job that opens the store closes runs of this host whose process is gone as
  FAILED, fixes their run.json and removes the staging folder they left.
- `sync` (pipeline.tracking.sync): a job whose results are on disk but not in MLflow
  (the server died mid-run) is uploaded from its run folder.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import PipelineError

PREFLIGHT_SECONDS = 10.0


class StoreUnavailable(PipelineError):
    """The MLflow store cannot be used: found before any stage (or while the first ones run)."""


class TrackingError(PipelineError):
    """The job finished, its results are on disk, but MLflow did not take them: exit 4, then sync."""

    exit_code = 4


def process_identity(pid: int | None = None) -> dict[str, str]:
    """host, pid and the pid's start time (ticks since boot): a reused pid is not the same process."""
    pid = pid or os.getpid()
    return {"pipeline.host": socket.gethostname(), "pipeline.pid": str(pid),
            "pipeline.pid_start": str(_start_ticks(pid))}


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_alive(tags: dict[str, str]) -> bool:
    """Whether the process that opened a run (by its tags) still runs; True when it cannot be told."""
    if tags.get("pipeline.host") != socket.gethostname() or not tags.get("pipeline.pid", "").isdigit():
        return True  # another machine: only its own jobs can tell
    pid = int(tags["pipeline.pid"])
    start = _start_ticks(pid)
    return start is not None and str(start) == tags.get("pipeline.pid_start")


def preflight(uri: str) -> None:
    """One line in seconds if the store at `uri` cannot be used."""
    if uri.startswith("sqlite:///"):
        _check_sqlite(Path(uri.removeprefix("sqlite:///")))
    elif uri.startswith(("http://", "https://")):
        _check_server(uri.rstrip("/"))


def _check_sqlite(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            raise IsADirectoryError(f"{path} is not a file")
        probe = path.parent / f".{path.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StoreUnavailable(f"the MLflow store {path} cannot be written ({type(err).__name__}: {err}).",
                            "point tracking.store (or MLFLOW_TRACKING_URI) at a writable place, "
                            "or set tracking.enabled=false.") from None


def _check_server(uri: str) -> None:
    """The URI must answer MLflow's REST API as MLflow does (JSON listing experiments), not just answer.

    A proxy, a UI-only server or a wrong port answers HTTP 404 (or a web page) to everything:
    caught here, not after every stage has run and the results cannot be recorded.
    """
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(f"{uri}{path}")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=PREFLIGHT_SECONDS) as response:
            answer = response.read(1 << 20)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise StoreUnavailable(f"the MLflow server at {uri} refused the credentials (HTTP {err.code}).",
                                   "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.") from None
        raise not_mlflow(uri, f"{path.split('?')[0]} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StoreUnavailable(f"the MLflow server at {uri} does not answer ({reason}).",
                               "start it (see README, MLflow), fix MLFLOW_TRACKING_URI, or set "
                               "tracking.enabled=false; results of a run can be sent later with "
                               "python -m pipeline.tracking sync <run_dir>.") from None
    try:
        listing = json.loads(answer)
    except ValueError:
        listing = None
    if not isinstance(listing, dict) or not isinstance(listing.get("experiments", []), list):
        raise not_mlflow(uri, f"{path.split('?')[0]} answered something other than MLflow's JSON")


def not_mlflow(uri: str, what: str) -> StoreUnavailable:
    return StoreUnavailable(f"{uri} is not an MLflow tracking server: {what}.",
                            "point MLFLOW_TRACKING_URI at the MLflow server itself (mlflow server prints "
                            "its address), or set tracking.enabled=false.")


def close_dead_runs(client, experiment_id: str) -> list[str]:
    """Close RUNNING runs of this host whose process died (SIGKILL, power loss) as FAILED."""
    from mlflow.entities import RunTag

    host = socket.gethostname()
    closed = []
    runs = client.search_runs([experiment_id], max_results=500,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`pipeline.host` = '{host}'")
    for run in runs:
        tags = run.data.tags
        if is_alive(tags):
            continue
        reason = (f"its process (pid {tags.get('pipeline.pid')} on {host}) ended without closing the run: "
                  "killed or crashed")
        client.log_batch(run.info.run_id, tags=[RunTag("error", reason), RunTag("status", "FAILED")])
        client.set_terminated(run.info.run_id, status="FAILED")
        mark_failed(Path(tags["run_dir"]), reason) if tags.get("run_dir") else None
        closed.append(run.info.run_id)
    return closed


def mark_failed(run_dir: Path, reason: str) -> None:
    """A dead job's run folder: run.json says FAILED, its staging folders are gone."""
    from pipeline import layout
    from pipeline.files import write_json

    if not run_dir.is_dir():
        return
    for leftover in run_dir.glob(".*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    record = run_dir / layout.RUN_JSON
    try:
        data = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if data.get("status") in (None, "RUNNING"):
        write_json(record, {**data, "status": "FAILED", "error": reason})


# Folders under an outputs folder that hold copies of run files (artifacts), or no runs at all.
NOT_RUNS = {"mlartifacts", "mlruns", "artifacts", "cache", "compare", "__pycache__"}


def run_folders(root: Path):
    """Every run folder (a run.json) at or under `root`, sweep jobs included; stores and the cache skipped."""
    from pipeline import layout

    for folder, subfolders, files in os.walk(root):
        if layout.RUN_JSON in files:
            subfolders.clear()  # stage folders hold no runs
            yield Path(folder)
        else:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in NOT_RUNS)


def close_dead_folders(root: Path) -> list[Path]:
    """run.json files still RUNNING whose process died (SIGKILL, out of memory) marked FAILED.

    Done by every job on its outputs folder whether it tracks or not: with tracking off,
    the run folder is the only record there is.
    """
    closed: list[Path] = []
    if not root.is_dir():
        return closed
    for run_dir in run_folders(root):
        try:
            data = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError):
            continue
        process = data.get("process") or {}
        if data.get("status") != "RUNNING" or not process or is_alive(process):
            continue
        try:
            mark_failed(run_dir, f"its process (pid {process.get('pipeline.pid')} on {process.get('pipeline.host')}) "
                                 "ended without closing the run: killed or crashed")
        except OSError:  # someone else's folder: theirs to close
            continue
        closed.append(run_dir)
    return closed

