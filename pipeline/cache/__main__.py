"""`python -m pipeline.cache list|prune` (the command line lives in pipeline/cache/cli.py)."""

from pipeline.cache.cli import main

main()
