"""Compile PyTorch models into inference engines, one declarative command per build.

`pipeline.load(run_dir)` turns a finished run back into a callable module.
"""


def load(run_dir):
    """Rebuild the compiled module of a run folder (see pipeline.hybrid)."""
    from pipeline.hybrid import load as _load

    return _load(run_dir)
