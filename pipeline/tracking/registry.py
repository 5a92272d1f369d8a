"""`register=true`: the compiled program as an MLflow model, a registered version and an alias.

The model is the run folder's stage outputs plus pipeline/tracking/serving.py ("models
from code": nothing pickled), so `mlflow models serve -m models:/<name>@<alias>
--env-manager local` answers REST predictions with the engine, in an environment
where this package is installed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline import layout

# What pipeline.load needs of a run folder (each stage folder with its manifest).
MODEL_PARTS = (*layout.LOAD_STAGES, layout.RUN_CONFIG)


def _copy_run(run_dir: Path, into: Path) -> Path:
    """The parts of the run the model needs, hard-linked where the disk allows."""
    from pipeline.cache import link_tree

    target = into / "run"
    target.mkdir()
    for part in MODEL_PARTS:
        src = run_dir / part
        if src.is_dir():
            link_tree(src, target / part)
        else:
            shutil.copy2(src, target / part)
    return target


def _numpy_dtype(name: str):
    """numpy's dtype of a torch dtype name; bfloat16, which numpy lacks, travels as float32."""
    import numpy as np

    return np.dtype("float32" if name == "bfloat16" else name)


def _signature(run_dir: Path):
    """Inputs as the engine takes them (static sizes exact, -1 for dynamic ones), outputs from a call.

    MLflow enforces the input schema before predict, so a request of the wrong rank or static
    size gets MLflow's 400; ranges of dynamic sizes are checked by the served module itself.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from pipeline import input_guard, shapes
    from pipeline.hybrid import load

    spec = input_guard.spec_of_run(run_dir)
    sample = shapes.load_samples(run_dir / "export" / layout.EXPORT.example)["opt"]
    out = load(run_dir)(*sample.args, **sample.kwargs)
    while isinstance(out, (tuple, list)):
        out = out[0]
    out = out.detach().cpu().float().numpy()
    named = len(spec) > 1  # one input: requests send a bare array; several: a dict by name
    inputs = Schema([TensorSpec(_numpy_dtype(t.dtype), t.mlflow_shape(), t.name if named else None) for t in spec])
    batch = spec[0].axes[0] if spec and spec[0].axes else None
    out_shape = (-1 if not isinstance(batch, int) else batch, *out.shape[1:]) if out.ndim else ()
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(out.dtype, out_shape)]))


def register(uri: str, client, run_dir: Path, model_name: str, alias: str | None,
             source_run: str | None) -> dict:
    """Log the compiled program as a pyfunc model, register a version of `model_name`, point `alias` at it.

    `client` is the Tracker's (for the alias), handed down so this module never imports the Tracker's.
    """
    import mlflow
    import torch

    mlflow.set_tracking_uri(uri)
    # Logged inside the job's own (finished) run: the model sits under the run in the UI, and in
    # its experiment's artifact store, not in MLflow's default experiment.
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=source_run):
        model_run = _copy_run(run_dir, Path(tmp))
        info = mlflow.pyfunc.log_model(
            name="compiled", python_model=str(Path(__file__).with_name("serving.py")),
            artifacts={"run": str(model_run)}, signature=_signature(run_dir),
            registered_model_name=model_name, await_registration_for=60,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "onnxruntime", "omegaconf"],
            tags={"source_run_id": source_run or ""})
    version = info.registered_model_version
    if not alias:  # MLflow reserves `latest`: models:/<name>/latest already means the newest version
        return {"model": model_name, "version": str(version), "uri": f"models:/{model_name}/{version}"}
    client.set_registered_model_alias(model_name, alias, version)
    return {"model": model_name, "version": str(version), "alias": alias, "uri": f"models:/{model_name}@{alias}"}
