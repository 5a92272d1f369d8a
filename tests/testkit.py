"""Helpers shared by the test modules: compose the real config, run real jobs, read results.

Everything here drives the real code paths (Hydra's compose API, pipeline.runner.Runner,
the MLflow SQLite store, `python -m pipeline` in a subprocess); nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import layout  # noqa: E402  (the repo is on sys.path from here on)
from pipeline.files import describe_files, write_json  # noqa: E402

STAGES = layout.STAGES
# Environment that changes where runs are tracked or how errors print: never inherited.
ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "HYDRA_FULL_ERROR", "PIPELINE_DEBUG")
# The shrunk job every test starts from: a tiny model, small images, few timing iterations.
SMALL = {"model": "tiny_cnn", "input": "image_64", "validate": "quick"}
# ResNet-18 runs keep ONNX Runtime to one thread. With the default pools, the spinning threads
# of the hybrid's 8 sessions take the cores from PyTorch: on 2 cores validate measured eager
# ResNet-18 (64x64) at ~200 ms p50 instead of ~16 ms, and spent 3x longer doing it.
ORT_1_THREAD = ("target=onnxruntime", "target.intra_op_num_threads=1")
RESNET18 = ("model=resnet18", "validate.iterations=4", "validate.warmup=1")


def overrides(outputs: Path, extra: tuple[str, ...] | list[str] = (), cache: Path | None = None) -> list[str]:
    """SMALL, paths under `outputs` (and `cache`), then `extra`; a group in `extra` replaces SMALL's."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in extra}
    out = [f"{k}={v}" for k, v in SMALL.items() if k not in given]
    out.append(f"paths.outputs={outputs}")
    if cache is not None:
        out.append(f"paths.cache={cache}")
    return out + list(extra)


def compose(outputs: Path, *extra: str, cache: Path | None = None, raw: bool = False):
    """The real config from conf/ through Hydra's compose API (raw: only `extra`)."""
    import hydra

    import pipeline.config  # noqa: F401  (registers the schemas)

    ovs = list(extra) if raw else overrides(outputs, extra, cache)
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra.compose(config_name="config", overrides=ovs, return_hydra_config=False)


@dataclass
class Job:
    outputs: Path
    run_dir: Path
    runner: Any
    result: Any
    console: Any

    @property
    def cache(self) -> Path:
        return Path(self.runner.config["paths"]["cache"])

    @property
    def log(self) -> str:
        return self.console.export_text(clear=False)

    def record(self, stage: str):
        return next(s for s in self.result.stages if s.name == stage)

    def json(self, rel: str) -> Any:
        return json.loads((self.run_dir / rel).read_text())


def make_runner(outputs: Path, *extra: str, cache: Path | None = None, run_dir: Path | None = None):
    from rich.console import Console

    from pipeline.runner import Runner

    cfg = compose(outputs, *extra, cache=cache)
    console = Console(file=io.StringIO(), record=True, width=200, soft_wrap=True, highlight=False)
    run_dir = run_dir or outputs / "run"
    return Runner(cfg, run_dir, console), console, run_dir


def run_job(outputs: Path, *extra: str, cache: Path | None = None, run_dir: Path | None = None) -> Job:
    """One job in this process, exactly as the CLI runs it (minus Hydra's run folder)."""
    from pipeline.tracking import Tracker

    runner, console, run_dir = make_runner(outputs, *extra, cache=cache, run_dir=run_dir)
    result = runner.run(Tracker(runner.config["tracking"]))
    return Job(outputs, run_dir, runner, result, console)


# --- MLflow -------------------------------------------------------------------------------

def mlflow_client(outputs: Path | None = None, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri or f"sqlite:///{Path(outputs).resolve() / 'mlflow.db'}")


def mlflow_runs(client, experiment: str = "pipeline") -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id])


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


# --- the cache ----------------------------------------------------------------------------

def half_written(cache: Path) -> list[Path]:
    """Staging or trash folders left under paths.cache/<stage>/ (a finished job leaves none)."""
    if not cache.exists():
        return []
    return sorted(p for p in cache.glob("*/.*") if p.is_dir() and p.name.startswith((".tmp-", ".trash-")))


def cache_entries(cache: Path, stage: str) -> list[Path]:
    folder = cache / stage
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.exists() else []


# --- subprocesses -------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(extra)
    return env


def cli_command(tmp: Path, *extra: str, cache: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "pipeline", *overrides(tmp, extra, cache), f"hydra.run.dir={tmp}/run"]


def run_cli(tmp: Path, *extra: str, cache: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(tmp, *extra, cache=cache), cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


# --- waiting, ports and a real MLflow server ---------------------------------------------

def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, root: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root}/server.db", "--default-artifact-root", f"{root}/artifacts",
           "--workers", "1"]
    # Without MLflow 3's job-execution workers (7 huey processes a server): the tests use none, and
    # on a 2-core CI box they cost every other test its CPU.
    env = {**clean_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            import urllib.request

            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return True
        except OSError:
            return False

    wait_for(up, timeout=240, what="mlflow server")
    return server


def stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:  # stopped already
        pass
    server.wait(30)


# --- models for input-spec tests ----------------------------------------------------------

def batch_branch_net():
    """Runs at every batch size, but takes another path for batch 1: torch.export must specialise it."""
    import torch

    class BatchBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x) * 2 if x.shape[0] == 1 else self.fc(x)

    return BatchBranch()


def value_branch_net():
    """Takes a path by its input's values (Python control flow on data): it cannot run on the meta device."""
    import torch

    class ValueBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else self.conv(-x)

    return ValueBranch()


def double_net():
    """Computes in float64 inside (weights and a cast): what truncate_long_and_double is for."""
    import torch

    class DoubleNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4).double()

        def forward(self, x):
            return torch.relu(self.fc(x.double())).float() + 1

    return DoubleNet()


def tiny_or_dying(die: bool = False):
    """tiny_cnn, or the job's process killed while building it: a worker lost mid-sweep (out of memory, preempted).

    The factory runs in the job's stage worker; PIPELINE_JOB_PID names the job process itself.
    """
    import os
    import signal

    from pipeline.zoo import tiny_cnn

    if die:
        os.kill(int(os.environ.get("PIPELINE_JOB_PID", os.getpid())), signal.SIGKILL)
    return tiny_cnn()


def slow_tiny(seconds: float = 60.0, until: str | None = None):
    """tiny_cnn after a pause in its factory: a job that is mid-build for as long as a test needs.

    With `until`, the pause ends once that file exists (or after `seconds`): the test creates
    it when it is done with the job mid-build, so no window of time has to be hit.
    """
    import time

    from pipeline.zoo import tiny_cnn

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and Path(until).exists()):
        time.sleep(0.1)
    return tiny_cnn()


def memory_hog(gib: float = 4.0):
    """tiny_cnn, after its factory touched `gib` GiB: a build that cannot fit in a small memory limit."""
    import torch

    from pipeline.zoo import tiny_cnn

    hog = torch.ones(int(gib * 2**30), dtype=torch.uint8)  # every page written: really resident
    del hog
    return tiny_cnn()


def segfault_net(crash: bool = True):
    """A model whose forward dies in native code (a NULL read through ctypes), as a broken compiler would."""
    import ctypes

    import torch

    class Segfault(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x):
            if crash:
                ctypes.string_at(0)
            return self.fc(x.mean(dim=(2, 3)))

    return Segfault()


# --- models for bad-input tests -----------------------------------------------------------

# Text with brackets that rich would take for markup: it must reach the user as it is.
BRACKETS = "no kernel for [aten.relu.default] in [bold]this build[/bold]"


def zeros_net():
    """tiny_cnn with a zero classification head (as torchvision gives ViT): every output is exactly 0."""
    import torch

    from pipeline.zoo import tiny_cnn

    model = tiny_cnn()
    torch.nn.init.zeros_(model[-1].weight)
    torch.nn.init.zeros_(model[-1].bias)
    return model


def raising_net():
    """A factory that fails while building the model, with brackets in its message."""
    raise RuntimeError(BRACKETS)


def exiting_net():
    """A factory that calls sys.exit() (a script's main() used as a factory): a bad model, not an exit."""
    import sys

    sys.exit(3)


def none_net():
    """A model whose forward returns None: nothing to compile or compare."""
    import torch

    class Nothing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x):
            self.fc(x.mean(dim=(2, 3)))

    return Nothing()


def raw_bert(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, intermediate_size: int):
    """transformers' BertModel returned as-is (bert_tiny's kwargs): its output is a ModelOutput, a pytree type."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                                num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                                vocab_size=1000, max_position_embeddings=128, attn_implementation="sdpa"))


# --- Inductor jobs and reloading in a fresh process ----------------------------------------

def inductor_job_or_skip(tmp_path_factory, name: str, *extra: str, tracked: bool = False) -> Job:
    """A tiny_cnn job on target=inductor (its own cache; untracked unless `tracked`), or a skip saying what is missing."""
    import pytest

    from pipeline.targets.inductor import InductorTarget

    reason = InductorTarget.unavailable_reason()  # imports torch._inductor: not at collection
    if reason:
        pytest.skip(f"target=inductor cannot run here: {reason}")
    root = tmp_path_factory.mktemp(name)
    tracking = () if tracked else ("tracking.enabled=false",)
    return run_job(root / "out", "target=inductor", *tracking, *extra, cache=root / "cache")


def reload_in_fresh_process(run_dir: Path, script: str, tmp: Path, env: dict[str, str] | None = None,
                            timeout: float = 300):
    """(eager output of the run's model on a seeded input, what `script` saved from the run on that input).

    `script` gets argv: run folder, input file, output file, as the loading user would.
    """
    import torch
    from omegaconf import OmegaConf

    from pipeline.models import build_model

    cfg = OmegaConf.load(run_dir / "config.yaml")
    x = torch.randn(list(cfg.input.tensors[0].shape), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = build_model(cfg.model)(x)
    torch.save(x, tmp / "x.pt")
    proc = subprocess.run([sys.executable, "-c", script, str(run_dir), str(tmp / "x.pt"), str(tmp / "y.pt")],
                          cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ref, torch.load(tmp / "y.pt")


def linear_net(width: int = 256):
    """A small linear-heavy model (patches of an image through an MLP): what torchao's fp8 linears serve."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class PatchMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 64, kernel_size=8, stride=8)
            self.mlp = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                     nn.Linear(width, 64))
            self.head = nn.Linear(64, 16)

        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            return self.head(self.mlp(tokens).mean(1))

    return PatchMLP().eval()


# --- tampering with run folders, as an attacker would ----------------------------------------

def replace(path: Path, data: bytes) -> None:
    """A new file in place of `path`: the cache's inode behind a hard link is never written."""
    path.unlink()
    path.write_bytes(data)


def reseal(stage_dir: Path) -> None:
    """What an attacker does after tampering: make the manifest match the files again."""
    manifest = json.loads((stage_dir / layout.MANIFEST).read_text())
    manifest["files"] = describe_files(stage_dir)
    write_json(stage_dir / layout.MANIFEST, manifest)  # written through a rename: a new file too


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    replace(path, json.dumps(data).encode())
    reseal(path.parent)


def rewrite_archive(path: Path, change) -> None:
    """Rewrite entries of a real .pt2 zip: change(name below the root, bytes) -> bytes."""
    src = path.read_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename.split("/", 1)[1], zin.read(info.filename)))
    replace(path, out.getvalue())
