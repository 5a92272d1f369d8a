"""Entry point: `python -m pipeline [overrides]` (one build) or `-m` (a sweep).

Kept thin: Hydra composes and checks the config, the runner does the work, and the
value returned is the metric a sweeper optimises (p50 latency).
"""

import hydra

import pipeline.config  # noqa: F401  (registers the schemas)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> float | None:
    from pipeline.cli import run_job

    return run_job(cfg)


if __name__ == "__main__":
    main()
