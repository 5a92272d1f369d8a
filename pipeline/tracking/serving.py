"""The MLflow model of a compiled run (`register=true`), logged as MLflow "models from code".

This file is the model's code: MLflow stores it beside the run's artifacts and runs it
when the model is loaded (`mlflow models serve`, `mlflow.pyfunc.load_model`), so no
Python object is pickled. The model itself is the run folder's export, lower,
partition and build outputs and config.yaml, turned back into the compiled module by
`pipeline.load`, which treats them as data (see docs/security.md).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class CompiledModel(PythonModel):
    def load_context(self, context) -> None:
        import json
        from pathlib import Path

        import pipeline

        run = Path(context.artifacts["run"])
        self.module = pipeline.load(run)
        meta = json.loads((run / "export" / "model.json").read_text())
        self.inputs = meta["inputs"]

    def predict(self, context, model_input, params=None):
        """Tensors in (one array, or a dict of arrays by input name), the first output out, as numpy."""
        import numpy as np
        import torch

        if not isinstance(model_input, dict):
            model_input = {self.inputs[0]["name"]: model_input}
        args, kwargs = [], {}
        for spec in self.inputs:
            value = torch.as_tensor(np.asarray(model_input[spec["name"]]), dtype=getattr(torch, spec["dtype"]))
            if spec.get("keyword"):
                kwargs[spec["name"]] = value
            else:
                args.append(value)
        try:
            with torch.no_grad():
                out = self.module(*args, **kwargs)
        except ValueError as error:  # pipeline.input_guard: shapes the engine was not built for
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import BAD_REQUEST

            raise MlflowException(str(error), error_code=BAD_REQUEST) from None
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().cpu().float().numpy()


mlflow.models.set_model(CompiledModel())
