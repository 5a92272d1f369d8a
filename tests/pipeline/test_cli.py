"""`python -m pipeline` as users run it: exit codes, one `error:` line, no traceback.

Each case is a real subprocess (cwd = the repository, hydra.run.dir and paths.outputs in a
tmp folder). They are started a few at a time by one module fixture, since most of their
cost is importing torch and MLflow.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from testkit import (
    REPO,
    STAGES,
    artifact_paths,
    clean_env,
    cli_command,
    half_written,
    mlflow_client,
    mlflow_runs,
    run_cli,
)


@dataclass
class Case:
    overrides: tuple[str, ...]
    exit_code: int
    names: tuple[str, ...]  # what the message must name
    kind: str  # "compose": Hydra rejects it (one line, exit 2); "early": before any MLflow run; "run": a FAILED run
    extra: dict = field(default_factory=dict)


CASES = {
    "unknown_model": Case(("model=nope",), 2, ("Could not find 'model/nope'", "tiny_cnn"), "compose"),
    "unknown_target": Case(("target=nope",), 2, ("Could not find 'target/nope'", "onnxruntime"), "compose"),
    "unknown_target_name": Case(("target.name=nope",), 2, ("unknown target 'nope'",), "early"),
    "input_shape": Case(("target=onnxruntime", "input.tensors.0.shape=[1,5,64,64]"), 2,
                        ("does not fit model tiny_cnn", "[1, 5, 64, 64]"), "run"),
    "unknown_op": Case(("target=onnxruntime", "compile.torch_executed_ops=[aten.reluu.default]"), 2,
                       ("'aten.reluu.default'", "not an operator"), "run"),
    "full_compilation": Case(("target=onnxruntime", "compile.require_full_compilation=true",
                              "compile.torch_executed_ops=[aten.relu.default]"), 3,
                             ("require_full_compilation=true", "aten.relu.default"), "run"),
    "misspelled_key": Case(("compile.min_block_sise=3",), 2, ("min_block_sise",), "compose"),
    "wrong_type": Case(("compile.min_block_size=abc",), 2, ("compile.min_block_size", "'abc'"), "compose"),
}
OK = ("target=onnxruntime",)
VERBOSE = ("target=onnxruntime", "compile.torch_executed_ops=[aten.reluu.default]", "verbose=true")


@dataclass
class Outcome:
    tmp: Path
    returncode: int
    output: str


@pytest.fixture(scope="module")
def cli(tiny_job, tmp_path_factory):
    """Run every case (plus a good job and a verbose failure), three processes at a time."""
    root = tmp_path_factory.mktemp("cli")
    jobs = {name: c.overrides for name, c in CASES.items()} | {"ok": OK, "verbose": VERBOSE}
    pending, running, done = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < 3:
            name = pending.pop(0)
            tmp = root / name
            tmp.mkdir()
            log = open(tmp.parent / f"{name}.out", "w")
            proc = subprocess.Popen(cli_command(tmp, *jobs[name], cache=tiny_job.cache), cwd=REPO,
                                    env=clean_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
            running[name] = (tmp, proc, log, time.monotonic())
        for name, (tmp, proc, log, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started > 300:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                log.close()
                done[name] = Outcome(tmp, proc.returncode, (tmp.parent / f"{name}.out").read_text())
                del running[name]
        time.sleep(0.1)
    return done


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_with_one_line(cli, tiny_job, name):
    case, out = CASES[name], cli[name]
    text = out.output
    assert out.returncode == case.exit_code, text
    assert "Traceback" not in text
    for needle in case.names:
        assert needle in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert all(needle in errors[0] for needle in case.names) and " Fix: " in errors[0]
    if case.kind == "compose":  # Hydra's message on one line; nothing was created
        assert not (out.tmp / "run").exists() and not (out.tmp / "mlflow.db").exists()
        return
    assert errors[0] in (out.tmp / "run" / "console.log").read_text()
    assert half_written(tiny_job.cache) == []
    runs = mlflow_runs(mlflow_client(out.tmp)) if (out.tmp / "mlflow.db").exists() else []
    if case.kind == "early":
        assert runs == []
        return
    (run,) = runs
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == errors[0].removeprefix("error: ")


def test_good_job_prints_a_summary(cli):
    out = cli["ok"]
    assert out.returncode == 0, out.output
    assert "Traceback" not in out.output and "error:" not in out.output
    assert "finished: onnxruntime" in out.output
    for stage in STAGES:
        assert stage in out.output
    assert "speedup" in out.output and "1 accelerated of 1 segments" in out.output
    assert f"artifacts: {out.tmp / 'run'}" in out.output
    (run,) = mlflow_runs(mlflow_client(out.tmp))
    assert run.info.status == "FINISHED" and run.info.run_id in out.output
    assert {run.data.tags[f"cache.{s}"] for s in STAGES[:-1]} == {"hit"}
    assert (out.tmp / "run" / "console.log").read_text().strip()
    assert not (out.tmp / "run" / "pipeline.log").exists()  # Hydra's log file stayed empty: not written at all
    assert run.data.tags["speedup"].removesuffix(" ~") == f"{run.data.metrics['speedup']:.2f}x"
    # The direct links: the experiment's runs table (not MLflow's landing page) and the run.
    assert f"#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning" in out.output
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in out.output


def test_a_custom_factory_is_labelled_by_its_name_not_the_preset(tmp_path):
    proc = run_cli(tmp_path, "model=resnet18", "model._target_=pipeline.zoo.tiny_cnn", "target=onnxruntime")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = mlflow_runs(mlflow_client(tmp_path))
    assert run.info.run_name.startswith("tiny_cnn onnxruntime ") and run.data.params["model.name"] == "tiny_cnn"


def test_good_job_logs_its_console_to_mlflow(cli):
    out = cli["ok"]
    client = mlflow_client(out.tmp)
    (run,) = mlflow_runs(client)
    assert "console.log" in artifact_paths(client, run.info.run_id)


def test_verbose_shows_the_traceback(cli):
    out = cli["verbose"]
    assert out.returncode != 0
    assert "Traceback" in out.output and "ConfigError" in out.output
    assert "error: compile.torch_executed_ops names 'aten.reluu.default'" in out.output


@pytest.mark.parametrize("trusted", [0.0, 1.0])
def test_the_summary_line_marks_a_speedup_from_an_untrusted_latency(trusted):
    import io

    from rich.console import Console

    from pipeline.cli import _print_measurements

    console = Console(file=io.StringIO(), width=300, highlight=False)
    _print_measurements(console, {"max_abs_err": 1e-7, "rel_l2_err": 1e-7, "cosine_similarity": 1.0,
                                  "latency_p50_ms": 0.2, "latency_p99_ms": 0.3, "eager/latency_p50_ms": 185.15,
                                  "speedup": 925.75, "throughput_per_s": 5000.0, "latency_trusted": trusted,
                                  "latency_threads": 2.0})
    line = console.file.getvalue()
    assert ("speedup 925.75x ~," in line) is (trusted == 0.0) and "2 thread(s) each" in line
    assert ("speedup 925.75x," in line) is (trusted == 1.0)
