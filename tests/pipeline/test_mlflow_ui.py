"""What a person sees of a sweep in the MLflow UI, checked in a real browser against a real server.

The parent's description and comparison.md are markdown that MLflow renders with its own
components: the artifact pane gives every column of a markdown table the same width, which
once left comparison.md a few letters a line. Unit tests of the text cannot see that, so
this serves a store with `mlflow server` and opens it in headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright; CI installs both). Skipped where either is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from testkit import clean_env

from pipeline import compare, tracking
from pipeline.tracking import sweeps

CHROMIUM = "/usr/bin/chromium"
# Chromium on a machine without a display, a GPU or a network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ERROR = ("convert failed: op aten.foo has no ONNX export. Fix: keep it in PyTorch with "
         "compile.torch_executed_ops=[aten.foo.default].")

if not Path(CHROMIUM).is_file():
    pytest.skip(f"no {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def job(number: int, target: str, latency: float | None, error: str | None = None) -> dict:
    metrics = {} if latency is None else {"latency_p50_ms": latency, "rel_l2_err": 1e-6 * (number + 1),
                                          "speedup": 1.5, "validated": 1.0, "accuracy_passed": 1.0,
                                          "latency_trusted": 1.0, "cosine_similarity": 0.999999,
                                          "num_engines": 0.0 if target == "eager" else 1.0}
    return {"job": number, "name": str(number), "run_id": f"run{number}",
            "overrides": f"compile.min_block_size={number} target={target}", "target": target, "status": "FAILED" if error else "FINISHED", "error": error, "metrics": metrics,
            "tags": {}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free port, over a store it creates (one migration of a new store, not two)."""
    tmp = tmp_path_factory.mktemp("ui")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No job executor: the UI needs none, and its worker processes cost seconds to start and stop.
    env = clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp / "mlartifacts")],
                            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
                time.sleep(0.5)
        yield url
    finally:  # the server's own process group: its uvicorn and job workers go with it
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def add_children(client, parent: dict, jobs: list[dict]) -> None:
    """Child runs as a sweep's jobs record them: the runner's tags, named by pipeline.naming, with their metrics."""
    from mlflow.entities import Metric

    from pipeline import naming

    for j in jobs:
        name = naming.child_name(j["overrides"], ["compile.min_block_size", "target"], j["target"])
        run = client.create_run(parent["experiment_id"], run_name=name, tags={
            "sweep.id": "ui-test", "sweep.job": str(j["job"]), "mlflow.parentRunId": parent["run_id"],
            "target": j["target"], "sweep.overrides": j["overrides"], "model": "tiny_cnn",
            **({"latency.trusted": "true"} if j["metrics"] else {})})
        j.update(run_id=run.info.run_id, run_name=name)
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in j["metrics"].items()])
        client.set_terminated(run.info.run_id, status=j["status"])


@pytest.fixture(scope="module")
def parent(server, tmp_path_factory):
    """A sweep written through the server the way a sweep writes it: children, their marks, the parent's report."""
    from mlflow import MlflowClient

    from pipeline import sweep

    tmp = tmp_path_factory.mktemp("report")
    settings = {"store": "unused", "artifacts": "unused", "experiment": "pipeline"}
    jobs = [job(0, "onnxruntime", 0.43), job(1, "eager", 1.1), job(2, "onnxruntime", None, ERROR)]
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server
    try:
        parent = sweeps.start_parent(settings, "ui-test", {"sweep.overrides": "compile.min_block_size=0,1,2"},
                                       run_name="sweep min_block_size=0,1,2 target=onnxruntime,eager")
        add_children(MlflowClient(server), parent, jobs)
        title = "sweep ui-test: 3 jobs, 1 failed"
        files = compare.write_report(jobs, tmp, title)
        note = compare.note(jobs, title, lambda run_id: tracking.ui_path(parent["experiment_id"], run_id))
        summary = sweep.summarise(jobs, sweep.best_job(jobs), tmp)
        sweeps.finish_parent(settings, parent["run_id"], "FAILED", summary["metrics"], summary["tags"], files,
                               note=note, child_tags=summary["child_tags"])
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return parent


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    """Where the pages are saved as PNG, for a person to look at (printed by the tests that take them)."""
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def page(server):
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                           viewport={"width": 1280, "height": 900})
            try:
                yield browser.new_page()
            finally:
                browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_the_printed_link_opens_the_runs_with_the_deciding_columns_best_first(parent, server, page, screenshots):
    """The sweep's link (a saved view): its jobs, with p50, speedup, trust and accuracy columns, fastest first."""
    from pipeline.tracking import views

    page.goto(tracking.ui_link(server, parent["experiment_id"], view=views.sweep_key("ui-test")))
    page.get_by_text(re.compile(r"\bmatching runs?\b")).wait_for(timeout=60_000)
    for header in ("latency_p50_ms", "speedup", "latency_trusted"):
        page.get_by_role("columnheader", name=re.compile(re.escape(header))).first.wait_for(timeout=30_000)
    page.get_by_text("★ 0 onnxruntime", exact=False).first.wait_for(timeout=30_000)
    page.screenshot(path=str(screenshots / "runs_table.png"), full_page=True)
    print(f"screenshot: {screenshots / 'runs_table.png'}")
    rows = page.get_by_role("row").all_inner_texts()
    named = [r for r in rows if "onnxruntime" in r or "eager" in r]
    assert named and "★ 0 onnxruntime" in named[0], rows  # the winner first, marked
    assert not any(r.startswith("sweep ") for r in named), rows  # the jobs themselves, not folded under the parent
    # The grid draws the pinned name column and the value columns as separate rows, in the same order.
    values = [r.split("\n") for r in rows if re.match(r"[\d.-]", r)]
    assert values and {"0.43", "1.5", "1"} <= set(values[0]), rows  # the winner's p50, speedup and trust, first


def test_the_parent_description_is_a_table_with_full_errors(parent, server, page, screenshots):
    page.goto(tracking.ui_link(server, parent["experiment_id"], parent["run_id"]))
    page.get_by_text("Description").first.wait_for(timeout=60_000)
    # The verdict first: the winning job, its deciding figures rounded for reading.
    page.get_by_text("Winner: job 0 (compile.min_block_size=0 target=onnxruntime): p50 0.43 ms, 1.5x eager",
                     exact=False).first.wait_for(timeout=30_000)
    page.screenshot(path=str(screenshots / "parent_run.png"), full_page=True)
    if page.get_by_text("Show more").count():
        page.get_by_text("Show more").first.click()
    table = page.locator("table").filter(has_text="overrides").first
    table.wait_for(timeout=30_000)
    assert table.locator("tr").count() == 1 + 3  # header and one row per job
    # One job per line: the overrides cell is not folded a few letters a line.
    cell = table.get_by_text("compile.min_block_size=0 target=onnxruntime").first
    assert cell.bounding_box()["height"] < 3 * 20
    # The full error, fix included, with its brackets: text, not markup.
    assert page.get_by_text("compile.torch_executed_ops=[aten.foo.default]", exact=False).count() >= 1
    assert table.locator("a").first.get_attribute("href").startswith(f"#/experiments/{parent['experiment_id']}/runs/")


def test_comparison_md_reads_one_job_a_line_in_the_artifact_pane(parent, server, page):
    page.goto(tracking.ui_link(server, parent["experiment_id"], parent["run_id"]))
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("comparison.md", exact=True).first.click()
    code = page.locator("code").filter(has_text="onnxruntime").first
    code.wait_for(timeout=60_000)
    lines = code.inner_text().splitlines()
    assert any("onnxruntime" in line and "FINISHED" in line and "0.430" in line for line in lines), lines
    assert page.get_by_text("Errors of the failed jobs, in full").count() == 1


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_ui_starts_the_ui_alone():
    """No job-execution workers (MLflow 3 starts 7 huey processes), one web worker, the Starlette warning filtered."""
    repo = Path(__file__).resolve().parents[2]
    recipe = subprocess.run(["make", "-n", "ui", "PY=python"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout
    server = next(line for line in recipe.replace("\\\n", " ").splitlines() if "mlflow ui" in line)
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in server and "--workers 1" in server
    assert 'PYTHONWARNINGS="ignore:starlette.middleware.wsgi is deprecated"' in server
