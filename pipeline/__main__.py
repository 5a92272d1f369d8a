"""Entry point: `python -m pipeline [overrides]` (one build) or `-m` (a sweep).

Kept thin: Hydra composes and checks the config, the runner does the work, and the
value returned is the metric a sweeper optimises (p50 latency; NaN for a failed job).
"""

import hydra

import pipeline.config  # noqa: F401  (registers the schemas)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> float | None:
    from pipeline.cli import run_job

    return run_job(cfg)


def entry() -> None:
    """Run Hydra; after a sweep, finish its summary (even if Hydra failed) and exit 1 if a job failed."""
    import sys

    from pipeline import sweep

    try:
        main()
    finally:
        failed = sweep.finalize() if sweep.STATE else 0
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    entry()
