"""register=true: the compiled program as a registered MLflow model, served over REST by `mlflow models serve`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from testkit import REPO, clean_env, cli_command, mlflow_client

import pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, payload: dict) -> tuple[int, str]:
    """POST /invocations; the HTTP status and body, errors included."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_registered_model_serves_the_engine_over_rest(tmp_path):
    job = subprocess.run(cli_command(tmp_path, "experiment=smoke", "target=onnxruntime", "register=true"),
                         cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "registered: models:/tiny_cnn/1 (version 1)" in job.stdout
    client = mlflow_client(tmp_path)
    (version,) = client.search_model_versions("name='tiny_cnn'")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["tracking"]["registered"]["uri"] == "models:/tiny_cnn/1" and str(version.version) == "1"
    assert version.run_id == record["tracking"]["run_id"]  # logged under the job's own run

    port = free_port()
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny_cnn/latest",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL,
                              # MLflow starts `uvicorn` by name: the venv's bin must be on PATH.
                              env=clean_env(MLFLOW_TRACKING_URI=uri,
                                            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"),
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
        body = json.dumps({"inputs": x.tolist()}).encode()
        deadline, answer = time.monotonic() + 180, None
        while answer is None and time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, "mlflow models serve never answered"
        served = torch.tensor(answer["predictions"])
        with torch.no_grad():
            local = pipeline.load(tmp_path / "run")(x)
        local = local[0] if isinstance(local, (tuple, list)) else local
        assert served.shape == local.shape and torch.allclose(served, local, atol=1e-5)
        status, text = post(port, {"inputs": torch.randn(2, 3, 64, 64).tolist()})
        assert 400 <= status < 500, (status, text)
        error = json.loads(text)
        assert "(2, 3, 64, 64)" in error["message"] and "(1, 3, 64, 64)" in error["message"], error["message"]
        assert "stack_trace" not in error and "Traceback" not in text
    finally:
        server.terminate()
        server.wait(30)
