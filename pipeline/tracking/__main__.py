"""`python -m pipeline.tracking sync FOLDER...`: send results that are on disk but not in MLflow.

For jobs whose results did not reach the store (the server was down, the SQLite file
deleted or unwritable: exit 4) and sweeps whose parent run was left open. A FOLDER is a
run folder, a sweep folder (its jobs and its parent run) or any folder above them. The
job's own run is reused where the store has it, and closed with the job's status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError, typed_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking",
                                     description="Send run folders' results to MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="upload what run folders (or whole sweeps) hold and close their runs")
    sync.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    args = parser.parse_args(argv)
    status = 0
    for folder in args.folders:
        status = max(status, sync_folder(folder))
    return status


def sync_folder(folder: Path) -> int:
    """Every sweep and run under `folder`; one line per problem, never a traceback. Its exit status."""
    from pipeline.tracking import sync

    if not folder.is_dir():
        print(f"error: {folder} is not a folder. Fix: pass a run folder, a sweep folder or a folder above them.",
              file=sys.stderr)
        return 2
    sweeps, runs = sync.discover(folder)
    if not sweeps and not runs:
        print(f"error: {folder} holds no run folder (a run.json) nor sweep (a sweep.json). "
              "Fix: pass the folder a job or sweep printed (artifacts: ..., or the sweep's jobs folder).",
              file=sys.stderr)
        return 2
    status = 0
    for sweep_dir in sweeps:
        status = max(status, _guarded(sweep_dir, lambda d=sweep_dir: _sync_sweep(d)))
    for run_dir in runs:
        status = max(status, _guarded(run_dir, lambda d=run_dir: _sync_run(d)))
    return status


def _sync_sweep(sweep_dir: Path) -> None:
    from pipeline.tracking import sync

    sent = sync.sync_sweep(sweep_dir, print)
    print(f"synced sweep {sweep_dir}: {sent} job(s) sent, parent run closed")


def _sync_run(run_dir: Path) -> None:
    import json

    from pipeline.tracking import sync

    info = None
    if (run_dir.parent / sync.SWEEP_FILE).is_file():  # one job of a sweep: keep its link to the parent
        info = json.loads((run_dir.parent / sync.SWEEP_FILE).read_text())
    tags = sync.job_tags(run_dir, info) if info else None
    done = sync.sync_run(run_dir, tags=tags)
    print(f"synced {run_dir}: run {done['run_id']} in experiment {done['experiment']!r} at {done['tracking_uri']}")


def _guarded(folder: Path, step) -> int:
    try:
        step()
        return 0
    except PipelineError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # MLflow's own errors: the store still away, a broken store
        print(f"error: {folder} could not be sent to MLflow ({typed_line(err)}). "
              f"Fix: check the tracking store, then run python -m pipeline.tracking sync {folder} again.",
              file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
