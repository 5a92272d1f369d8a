"""`python -m pipeline.tracking sync RUN_DIR...`: send finished runs' results to MLflow.

For jobs whose results are on disk but not in MLflow (the server was down, exit 4):
the job's own run is reused where the store has it, and closed with the job's status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import layout
from pipeline.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking",
                                     description="Send run folders' results to MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="upload what a run folder holds and close its MLflow run")
    sync.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    from pipeline.tracking.sync import sync as send

    failed = 0
    for run_dir in args.run_dirs:
        if not (run_dir / layout.RUN_JSON).is_file() or not (run_dir / layout.RUN_CONFIG).is_file():
            print(f"error: {run_dir} is not a run folder (no {layout.RUN_JSON} and {layout.RUN_CONFIG}).",
                  file=sys.stderr)
            failed = 2
            continue
        try:
            done = send(run_dir)
        except PipelineError as err:
            print(f"error: {err.one_line()}", file=sys.stderr)
            failed = err.exit_code
            continue
        print(f"synced {run_dir}: run {done['run_id']} in experiment {done['experiment']!r} at {done['tracking_uri']}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
