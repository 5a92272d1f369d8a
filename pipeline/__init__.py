"""Compile PyTorch models into inference engines, one declarative command per build.

`pipeline.load(run_dir)` turns a finished run back into a callable module; so does
`pipeline.load("runs:/<run_id>")` for a run in MLflow (MLFLOW_TRACKING_URI, or the local store).
"""


def load(run_dir, imports=(), trusted: bool = False):
    """Rebuild the compiled module of a run folder (see pipeline.hybrid).

    A run folder is not trusted: nothing in it is unpickled or evaluated, no file outside
    it (nor a device or FIFO) is opened, and of the modules it asks for only those you
    name in `imports` (your model's package) or this project registers are imported.
    `trusted=True` also imports every module the run recorded and loads engines that are
    code (AOTInductor, Torch-TensorRT) that your own jobs did not build. docs/security.md.
    """
    from pipeline.hybrid import load as _load

    names = (imports,) if isinstance(imports, str) else tuple(imports)
    if isinstance(run_dir, str) and run_dir.startswith("runs:/"):
        import tempfile
        from pathlib import Path

        from pipeline.tracking import download_run

        # Downloaded files are someone's upload: loaded as untrusted as any run folder.
        run_dir = download_run(run_dir, Path(tempfile.mkdtemp(prefix="pipeline-run-")))
    return _load(run_dir, imports=names, trusted=trusted)
