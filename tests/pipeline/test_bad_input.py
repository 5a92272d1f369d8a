"""Bad input through `python -m pipeline`: one `error:` line, exit 2 (3 for a build that fails), no traceback.

Every case is a real subprocess with tracking on and its own paths.outputs (so its own
MLflow store and cache). Settings the runner checks before any stage must leave no cache
entry at all and a FAILED MLflow run; mistakes Hydra catches while composing leave
nothing; failures inside a stage leave a FAILED run and no half-written entry. A few
in-process checks follow: printing text with brackets, a model whose output is all
zero, and ViT-B/16's head under random weights.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from testkit import (
    BRACKETS,
    REPO,
    STAGES,
    cache_entries,
    clean_env,
    half_written,
    mlflow_client,
    mlflow_runs,
    overrides,
)


def torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


BROKEN_MODULE = "raise RuntimeError('cannot load [libfoo.so]: missing')\n"


@dataclass
class Case:
    overrides: tuple[str, ...]
    names: tuple[str, ...]  # what the error line must hold, literally
    # "settings": checked before any stage (FAILED run, no cache entry); "run": fails in a stage
    # (FAILED run); "compose": Hydra rejects it (nothing written); "early": before the MLflow run.
    kind: str
    exit_code: int = 2
    extra: dict = field(default_factory=dict)


SETTINGS = {
    "iterations_0": Case(("validate.iterations=0",), ("validate.iterations=0", ">= 1"), "settings"),
    "iterations_negative": Case(("validate.iterations=-1",), ("validate.iterations=-1", ">= 1"), "settings"),
    "num_samples_0": Case(("validate.num_samples=0",), ("validate.num_samples=0", ">= 1"), "settings"),
    "rounds_0": Case(("validate.rounds=0",), ("validate.rounds=0", ">= 1"), "settings"),
    "rounds_over_iterations": Case(("validate.rounds=20", "validate.iterations=10"),
                                   ("validate.rounds=20", "validate.iterations=10"), "settings"),
    "warmup_negative": Case(("validate.warmup=-5",), ("validate.warmup=-5", ">= 0"), "settings"),
    "spread_threshold_0": Case(("validate.spread_warn_threshold=0",), ("validate.spread_warn_threshold=0", "> 0"),
                               "settings"),
    "min_seconds_inf": Case(("validate.min_seconds=inf",), ("validate.min_seconds=inf", "finite"), "settings"),
    "tolerance": Case(("validate.tolerances.fp32.min_cosine_similarity=2",),
                      ("validate.tolerances.fp32.min_cosine_similarity=2", "between -1 and 1"), "settings"),
    "min_block_size_0": Case(("compile.min_block_size=0",), ("compile.min_block_size=0", ">= 1"), "settings"),
    "min_block_size_negative": Case(("compile.min_block_size=-1",), ("compile.min_block_size=-1", ">= 1"),
                                    "settings"),
    "optimization_level_9": Case(("compile.optimization_level=9",),
                                 ("compile.optimization_level=9", "between 0 and 5"), "settings"),
    "cache_is_a_file": Case(("paths.cache={tmp}/a_file",), ("paths.cache=", "a_file is a regular file"), "settings"),
}
MODELS = {
    "factory_raises": Case(("model._target_=testkit.raising_net",),
                           ("testkit.raising_net", "RuntimeError", BRACKETS), "run"),
    "factory_exits": Case(("model._target_=testkit.exiting_net",), ("testkit.exiting_net", "SystemExit: 3"), "run"),
    "factory_import_fails": Case(("model._target_=broken_models.build",),
                                 ("broken_models", "fails at import", "[libfoo.so]"), "run"),
    "factory_missing": Case(("model._target_=testkit.no_such_factory",),
                            ("testkit.no_such_factory", "no attribute"), "run"),
    "forward_returns_none": Case(("model._target_=testkit.none_net",), ("returned NoneType", "no tensor"), "run"),
    "unknown_op": Case(("target=onnxruntime", "compile.torch_executed_ops=[aten.reluu.default]"),
                       ("'aten.reluu.default'", "not an operator"), "run"),
    "full_compilation": Case(("target=onnxruntime", "compile.require_full_compilation=true",
                              "compile.torch_executed_ops=[aten.relu.default]"),
                             ("require_full_compilation=true", "aten.relu.default"), "run", exit_code=3),
    "validation_fails": Case(("target=onnxruntime", "validate.tolerances.fp32.rel_l2_err=1e-30"),
                             ("validation failed", "rel_l2_err"), "run", exit_code=3),
    "torch_tensorrt_missing": Case(("target=torch_tensorrt",), ("pip install -e '.[torch-tensorrt]'",), "run",
                                   extra={"skip": importlib.util.find_spec("torch_tensorrt") is not None
                                          and "torch_tensorrt is installed here: the install hint is not printed"}),
    # An asked device that is absent, for targets that checked it late (inductor: at build) or never (eager).
    **{f"{name}_cuda_absent": Case((f"target={name}", "target.device=cuda"), ("target.device=cuda", "no CUDA GPU"),
                                   "settings", extra={"skip": torch_sees_cuda() and "a CUDA GPU is here"}) for name in ("eager", "inductor")},
    "bad_interpolation": Case(("paths.cache=${nope}",), ("Interpolation key 'nope' not found",), "early"),
}
COMPOSE = {
    "unknown_option": Case(("model=nope",), ("Could not find 'model/nope'", "tiny_cnn", "resnet50", "vit_b_16"),
                           "compose"),
    "misspelled_key": Case(("compile.min_block_sise=3",), ("min_block_sise",), "compose"),
    "wrong_type": Case(("compile.min_block_size=abc",), ("compile.min_block_size", "'abc'"), "compose"),
    "override_syntax": Case(("compile.min_block_size",), ("'compile.min_block_size'", "missing EQUAL"),
                            "compose"),
    "unbalanced_brackets": Case(("compile.torch_executed_ops=[aten.relu.default",), ("[aten.relu.default",),
                                "compose"),
}
CASES = {**SETTINGS, **MODELS, **COMPOSE}
# paths.outputs under a regular file (as root, chmod would not stop writes): no run folder, cache or
# MLflow store can exist there. With tracking on, opening the store may be what fails first.
OUTPUTS_UNDER_A_FILE = {"outputs_under_a_file": (), "outputs_under_a_file_untracked": ("tracking.enabled=false",)}


@dataclass
class Outcome:
    tmp: Path
    returncode: int
    output: str


def command(name: str, tmp: Path) -> list[str]:
    if name in OUTPUTS_UNDER_A_FILE:  # hydra.run.dir stays writable: the pipeline's own checks must catch it
        ovs = [o for o in overrides(tmp) if not o.startswith("paths.outputs=")] + [f"paths.outputs={tmp}/a_file/out"]
        ovs += OUTPUTS_UNDER_A_FILE[name]
    else:
        ovs = overrides(tmp, [o.replace("{tmp}", str(tmp)) for o in CASES[name].overrides])
    return [sys.executable, "-m", "pipeline", *ovs, f"hydra.run.dir={tmp}/run"]


def start(name: str, tmp: Path) -> subprocess.Popen:
    tmp.mkdir()
    (tmp / "a_file").write_text("not a folder\n")
    modules = tmp / "modules"
    modules.mkdir()
    (modules / "broken_models.py").write_text(BROKEN_MODULE)
    env = clean_env(PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(modules)]))
    log = open(tmp.parent / f"{name}.out", "w")
    return subprocess.Popen(command(name, tmp), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every case, three processes at a time (most of their cost is importing torch and MLflow)."""
    root = tmp_path_factory.mktemp("bad-input")
    pending = [n for n, c in CASES.items() if not c.extra.get("skip")] + list(OUTPUTS_UNDER_A_FILE)
    running, done = {}, {}
    while pending or running:
        while pending and len(running) < 3:
            name = pending.pop(0)
            running[name] = (start(name, root / name), time.monotonic())
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started > 300:
                proc.kill()
            if proc.poll() is not None:
                done[name] = Outcome(root / name, proc.returncode, (root / f"{name}.out").read_text())
                del running[name]
        time.sleep(0.1)
    return done


def error_line(out: Outcome) -> str:
    """The one `error:` line; never a traceback."""
    assert "Traceback" not in out.output, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.output
    return errors[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_prints_one_error_line(cli, name):
    case = CASES[name]
    if case.extra.get("skip"):
        pytest.skip(case.extra["skip"])
    out = cli[name]
    line = error_line(out)
    assert out.returncode == case.exit_code, out.output
    for needle in case.names:
        assert needle in line, line
    assert " Fix: " in line
    cache = out.tmp / "cache"
    assert half_written(cache) == []
    if case.kind == "compose":  # Hydra refused it: nothing was created
        assert not (out.tmp / "run").exists() and not (out.tmp / "mlflow.db").exists()
        return
    if case.kind == "early":
        assert not (out.tmp / "mlflow.db").exists()
        return
    assert line in (out.tmp / "run" / "console.log").read_text()
    (run,) = mlflow_runs(mlflow_client(out.tmp))
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == line.removeprefix("error: ")
    if case.kind == "settings":  # checked before any stage: not even export ran
        assert all(cache_entries(cache, stage) == [] for stage in STAGES)
        assert not any(line.startswith("done ") for line in out.output.splitlines()), out.output


@pytest.mark.parametrize("name", sorted(OUTPUTS_UNDER_A_FILE))
def test_outputs_under_a_regular_file(cli, name):
    """One line naming the folder that cannot be created (the MLflow store's, with tracking on)."""
    out = cli[name]
    line = error_line(out)
    assert out.returncode == 2, out.output
    assert f"{out.tmp}/a_file/out" in line, line
    if OUTPUTS_UNDER_A_FILE[name]:
        assert f"paths.outputs={out.tmp}/a_file/out cannot be created" in line and "a_file is a regular file" in line
    assert not (out.tmp / "cache").exists()


def test_compose_errors_keep_hydras_choices(cli):
    line = error_line(cli["unknown_option"])
    options = line.split("Available options in 'model':")[1].split(".")[0]
    assert [o.strip() for o in options.split(",")] == sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


# --- in process ---------------------------------------------------------------------------

def test_messages_print_brackets_as_they_are(tmp_path):
    """Error lines, comparison tables and the partition summary never take user text for markup."""
    from rich.console import Console

    from pipeline import compare
    from stages.partition import print_summary

    console = Console(file=io.StringIO(), record=True, width=300, soft_wrap=True, highlight=False)
    jobs = [{"job": 0, "overrides": "compile.torch_executed_ops=[aten.relu.default]", "status": "FAILED",
             "target": "onnxruntime", "error": BRACKETS, "metrics": {}}]
    console.print(compare.table(jobs, "sweep [bold]x[/bold]"))
    print_summary(console, {"target": "onnxruntime", "kept_in_torch": {
        "aten.relu.default": {"count": 2, "reasons": {"in [aten.relu.default]": 2}}}, "totals": {
        "accelerated_ops": 1, "ops": 3, "accelerated_segments": 1, "torch_ops": 2, "torch_segments": 1}})
    text = console.export_text()
    for needle in ("[aten.relu.default]", "sweep [bold]x[/bold]", "in [aten.relu.default] x2",
                   BRACKETS[:60]):
        assert needle in text, text


def test_cache_cli_prints_paths_as_they_are(tmp_path):
    folder = tmp_path / "cache [bold]x[/bold]"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cache", "list", "--cache", str(folder)], cwd=REPO,
                          env=clean_env(COLUMNS="300", PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"cache {folder}: empty" in proc.stdout


def test_all_zero_output_is_validated_as_equal_with_a_warning(tmp_path):
    """Eager and compiled both give zeros: equal (cosine 1 by definition), and the user is told why it says little."""
    from testkit import run_job

    job = run_job(tmp_path, "target=onnxruntime", "model._target_=testkit.zeros_net", "tracking.enabled=false")
    assert job.result.status == "FINISHED"
    m = job.result.metrics
    assert m["cosine_similarity"] == 1.0 and m["rel_l2_err"] == 0.0 and m["max_abs_err"] == 0.0
    report = job.json("validate/report.json")
    assert report["passed"] and any("output is constant" in w for w in report["warnings"])
    assert "output is constant" in job.log


def test_compare_defines_the_cosine_of_zero_outputs():
    import torch

    from pipeline.accuracy import compare, is_constant

    zeros = [[torch.zeros(2, 10)], [torch.zeros(2, 10)]]
    assert compare(zeros, zeros, True)["cosine_similarity"] == 1.0 and is_constant(zeros)
    ones = [[torch.ones(2, 10)], [torch.ones(2, 10)]]
    assert compare(zeros, ones, True)["cosine_similarity"] == 0.0  # zeros against non-zeros stay wrong
    assert not is_constant([[torch.arange(20.0).reshape(2, 10)]])


def test_vit_b_16_random_weights_give_nonzero_logits(tmp_path):
    """torchvision zero-initialises ViT's head; the zoo's random weights must give logits that differ."""
    import torch
    from testkit import compose

    from pipeline.models import build_model, weights_digest

    cfg = compose(tmp_path, "model=vit_b_16")
    model = build_model(cfg.model)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (2, 1000)
    assert logits.abs().max() > 1e-2 and logits.std() > 1e-2 and not torch.equal(logits[0], logits[1])
    assert weights_digest(build_model(cfg.model)) == weights_digest(model)  # seeded: export and validate agree
