"""Compile PyTorch models into inference engines, one declarative command per build.

`pipeline.load(run_dir)` turns a finished run back into a callable module.
"""


def load(run_dir, imports=(), trusted: bool = False):
    """Rebuild the compiled module of a run folder (see pipeline.hybrid).

    A run folder is not trusted: nothing in it is unpickled, no file outside it is
    opened, and of the modules it asks for only installed code is imported. `imports`
    names modules you trust (your model's package); `trusted=True` also imports every
    module the run recorded and loads engines that are code (AOTInductor, Torch-TensorRT)
    from a folder that is not your own cache's. README "Trust and security".
    """
    from pipeline.hybrid import load as _load

    names = (imports,) if isinstance(imports, str) else tuple(imports)
    return _load(run_dir, imports=names, trusted=trusted)
