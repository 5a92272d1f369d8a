"""The comparison of a sweep's jobs: pure functions on hand-made records, then real jobs via the CLI."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys

import pytest
from rich.console import Console
from testkit import REPO, clean_env, mlflow_client, mlflow_runs, run_job

from pipeline import compare, ranking, tracking
from pipeline.tracking import sweeps

PNG = b"\x89PNG\r\n\x1a\n"
STAGE_SECONDS = {f"{s}_seconds": 0.1 * (i + 1) for i, s in enumerate(compare.STAGES)}


def measured(latency: float, error: float, **extra) -> dict[str, float]:
    return {"accelerated_op_fraction": 0.97, "num_engines": 2, "latency_p50_ms": latency,
            "latency_p99_ms": latency * 1.3, "speedup": 1.83, "rel_l2_err": error, "cosine_similarity": 0.999999,
            "top1_agreement": 1.0, "accuracy_passed": 1.0, "validated": 1.0, **STAGE_SECONDS, **extra}


def record(job, target, metrics, status="FINISHED", error=None, overrides=None) -> dict:
    return {"job": job, "name": f"tiny_cnn-{target}", "run_id": f"run{job}",
            "overrides": overrides if overrides is not None else f"compile.min_block_size={job} target={target}",
            "target": target, "status": status, "error": error, "metrics": metrics, "tags": {}}


@pytest.fixture
def jobs() -> list[dict]:
    long_error = "convert failed: segment 0 has an op ONNX cannot export\n  (aten.foo) " + "x" * 200 + \
        " Fix: keep it in PyTorch with compile.torch_executed_ops=[aten.foo.default]."
    return [
        record(0, "onnxruntime", measured(3.0, 1e-6)),
        record(1, "onnxruntime", measured(4.0, 1e-5)),                  # dominated by job 0
        record(2, "tensorrt", measured(1.0, 1e-3)),                     # fastest, least accurate
        record(3, "tensorrt", {**STAGE_SECONDS, "accelerated_op_fraction": 1.0, "num_engines": 1,
                               "build_seconds": 2.5, "validated": 0.0}),  # cannot run here
        record(4, "onnxruntime", {"export_seconds": 0.2}, status="FAILED", error=long_error),
        record(5, "eager", measured(5.0, 0.0, num_engines=0)),          # exact: error 0
    ]


def test_columns_and_formatting(jobs):
    r = compare.rows(jobs)
    assert len(r) == len(jobs) and all(tuple(row) == compare.COLUMNS for row in r)
    first = r[0]
    assert first["job"] == "0" and first["overrides"] == "compile.min_block_size=0 target=onnxruntime"
    assert (first["status"], first["accel ops"], first["engines"], first["speedup"]) == ("FINISHED", "97.0%", "2", "1.83x")
    assert (first["p50 ms"], first["rel L2"], first["top-1"], first["error"]) == ("3.000", "1.00e-06", "100%", "-")
    assert first["build s"] == "0.50"


def test_a_speedup_text_carries_the_mark_of_an_untrusted_latency():
    """The single-run summary and the speedup tag print it as the tables do."""
    assert ranking.speedup_text({"speedup": 925.754, "latency_trusted": 0.0}) == "925.75x ~"
    assert ranking.speedup_text({"speedup": 1.834, "latency_trusted": 1.0}) == "1.83x"
    assert ranking.speedup_text({"speedup": 1.834}) == "1.83x" and ranking.speedup_text({}) == "-"
    # A steady engine over an unsteady eager: the ratio is still noise, the engine's own latency is not.
    eager_noisy = {"speedup": 2.37, "latency_trusted": 1.0, "speedup_trusted": 0.0, "latency_p50_ms": 0.5}
    assert ranking.speedup_text(eager_noisy) == "2.37x ~"
    job = {"job": 0, "status": "FINISHED", "target": "onnxruntime", "overrides": "", "metrics": eager_noisy}
    row = compare.rows([job])[0]
    assert row["speedup"].endswith(" ~") and not row["p50 ms"].endswith("~")


def test_missing_metrics_and_not_measured(jobs):
    r = compare.rows(jobs)
    not_here, failed = r[3], r[4]
    assert not_here["status"] == "FINISHED" and not_here["build s"] == "2.50"
    assert {not_here[c] for c in compare.MEASURED} == {"n/m"}
    assert {failed[c] for c in compare.METRIC_COLUMNS} == {"-"}
    assert failed["error"].startswith("convert failed: segment 0 has an op ONNX cannot export (aten.foo)")
    assert "\n" not in failed["error"] and "Fix:" not in failed["error"] and len(failed["error"]) <= 80


def test_labels_fall_back_to_positions_and_overrides_to_the_name():
    single = [record(None, "onnxruntime", {}, overrides=""), record(None, "eager", {}, overrides="")]
    r = compare.rows(single)
    assert [row["job"] for row in r] == ["0", "1"]
    assert [row["overrides"] for row in r] == ["tiny_cnn-onnxruntime", "tiny_cnn-eager"]
    repeated = [record(0, "onnxruntime", {}), record(0, "eager", {})]  # two sweeps' job 0
    assert compare.labels(repeated) == ["0", "1"]


def test_pareto_front(jobs):
    front = compare.pareto_front(jobs)
    assert [j["job"] for j in front] == [2, 0]  # fastest first; 1 is dominated, 3 and 4 unmeasured, 5 the yardstick
    assert all(any(f is j for j in jobs) for f in front)
    assert compare.pareto_front([]) == []
    twins = [record(0, "a", measured(1.0, 1e-6)), record(1, "b", measured(1.0, 1e-6))]
    assert len(compare.pareto_front(twins)) == 2  # equal points dominate neither


def test_table_colours_status_and_marks_the_front(jobs):
    t = compare.table(jobs, "sweep x")
    status = t.columns[1 + compare.COLUMNS.index("status")]
    styles = [str(cell.style) for cell in status._cells]
    assert styles[0] == "green" and styles[4] == "red"
    assert list(t.columns[0]._cells) == ["*", "", "best", "", "", "ref"]
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(t)
    text = console.export_text()
    assert "sweep x" in text and "n/m: not measured" in text and "1.83x" in text


def test_a_narrow_table_says_which_columns_it_hid_and_how_to_see_them(jobs):
    def shown(width):
        console = Console(record=True, width=250, file=io.StringIO())
        console.print(compare.table(jobs, "sweep x", width))
        return console.export_text()

    narrow, wide = shown(120), shown(None)
    assert "hidden: accel ops, engines, build s, p99 ms, top-1 (terminal of 120 columns; COLUMNS=160" in narrow
    assert "--wide" in narrow and "hidden:" not in wide
    assert "p99 ms" in [c.header for c in compare.table(jobs, "x", None).columns]
    assert "p99 ms" not in [c.header for c in compare.table(jobs, "x", 120).columns]


def test_a_cached_build_reads_hit_from_a_run_json_record_too(jobs):
    """The sweep's own table reads run.json, which has no cache.* tags: the build_cache_hit metric says it."""
    jobs[0]["metrics"].update(build_seconds=0.0, build_cache_hit=1.0)
    jobs[1]["metrics"].update(build_seconds=3.25, build_cache_hit=0.0)
    first, second = compare.rows(jobs)[:2]
    assert (first["build s"], second["build s"]) == ("hit", "3.25")


def test_markdown_has_one_line_per_job(jobs):
    """comparison.md: aligned text in a code block (MLflow's artifact pane squeezes markdown tables), full errors."""
    md = compare.markdown(jobs, "sweep x")
    assert md.startswith("## sweep x\n")
    block = md.split("```text\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert len(block) == 2 + len(jobs) and block[0].split()[:2] == ["job", "target"]
    assert len({len(line.rstrip()) for line in block[:2]}) == 1 and set(block[1]) <= {"-", " "}
    assert block[2 + 2].startswith("best    2  tensorrt") and "compile.min_block_size=2 target=tensorrt" in block[4]
    assert md.splitlines()[2] == "**Winner: job 2 (compile.min_block_size=2 target=tensorrt): p50 1 ms, 1.83x eager, rel L2 1.0e-03.**"
    # The failed job's error in full, fix and brackets included, after the table.
    assert "compile.torch_executed_ops=\\[aten.foo.default\\]" in md.split("```")[-1]
    assert "x" * 200 in md and md.count("Fix:") == 1


def test_note_is_a_compact_table_linking_each_job(jobs):
    note = compare.note(jobs, "sweep x", lambda run_id: f"#/experiments/1/runs/{run_id}")
    table = [line for line in note.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(jobs)
    assert [c.strip() for c in table[0].split("|")[1:-1]] == ["", *compare.NOTE_COLUMNS]
    assert note.splitlines()[0].startswith("**Winner: job 2 (compile.min")  # the verdict on the first line
    assert table[2 + 2].startswith("| best | [2](#/experiments/1/runs/run2) | compile.min_block_size=2 target=tensorrt |")
    assert all(line.count("|") == len(compare.NOTE_COLUMNS) + 2 for line in table)
    assert "- job 4 (compile.min_block_size=4 target=onnxruntime): convert failed" in note
    assert "\\[aten.foo.default\\]" in note and "min_block_size" in note  # brackets escaped, words untouched
    assert "[0](" not in compare.note(jobs, "sweep x")  # no link function: plain numbers


def test_no_winner_is_named_on_noise_and_the_yardstick_never_wins(jobs):
    noisy = [{**j, "metrics": {**j["metrics"], "latency_trusted": 0.0}} for j in jobs]
    best, reason = compare.winner(noisy)
    assert best is None and "varies too much to trust" in reason
    assert compare.winner_line(noisy).startswith("No winner: the latency of every candidate (3) varies too much")
    assert "best" not in compare.marks(noisy) and "best" not in compare.markdown(noisy, "x").split("```")[1]
    assert all(row["p50 ms"].endswith(" ~") and row["speedup"].endswith(" ~") for row in compare.rows(noisy)[:3])
    # Only a reference measured (eager; or min_block_size so large that nothing was accelerated).
    assert compare.winner([jobs[5]]) == (None, "only reference jobs (no engine) were measured")
    quiet = [{**j, "metrics": {**j["metrics"], "latency_trusted": 1.0}} for j in jobs[:2]]
    assert compare.winner([*noisy[:3], *quiet])[0] is quiet[0]  # a trusted job beats faster noise


def test_jobs_of_one_engine_are_one_figure_with_its_spread():
    one = [record(i, "onnxruntime", measured(lat, 1e-6, speedup=s)) for i, (lat, s) in
           enumerate([(0.4, 230.81), (2.0, 40.35), (1.0, 90.0)])]
    for job in one[:2]:
        job["build_key"] = "k" * 64
    rows = compare.rows(one)
    assert rows[0]["p50 ms"] == rows[1]["p50 ms"] == "1.200 ±67%"
    assert rows[0]["speedup"] == rows[1]["speedup"] == "135.58x ±70%" and rows[2]["speedup"] == "90.00x"
    assert compare.winner(one)[0] is one[2]  # 1.0 ms beats the shared engine's median 1.2 ms, not its lucky 0.4
    assert any(n.startswith("±: jobs 0, 1 built one engine") for n in compare.notes(one))


def test_paths_stay_out_of_the_overrides_users_read():
    job = record(0, "onnxruntime", measured(1.0, 1e-6),
                 overrides="paths.outputs=/tmp/x compile.min_block_size=3 hydra.launcher.n_jobs=2 +paths.cache=/c")
    assert compare.shown_overrides(job["overrides"]) == "compile.min_block_size=3"
    assert compare.rows([job])[0]["overrides"] == "compile.min_block_size=3"
    assert compare.winner_line([job]) == "Winner: job 0 (compile.min_block_size=3 on onnxruntime): p50 1 ms, 1.83x eager, rel L2 1.0e-06."


def test_ui_links_open_the_model_training_pages():
    assert tracking.ui_path("3") == "#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.ui_path("3", "abc") == "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.ui_link("http://host:8080/", "3", "abc") == "http://host:8080/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.ui_path("3", view="sweep-s1") == ("#/experiments/3/runs?workflowType=machine_learning"
                                                      "&viewStateShareKey=sweep-s1")


def test_csv_round_trips_raw_numbers(jobs, tmp_path):
    path = compare.write_csv(jobs, tmp_path / "c.csv")
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(jobs)
    for job, row in zip(jobs, back, strict=True):
        assert row["job"] == str(job["job"]) and row["status"] == job["status"] and row["run_id"] == job["run_id"]
        assert row["error"] == (job["error"] or "")
        for key, value in job["metrics"].items():
            assert float(row[key]) == value
    assert back[3]["latency_p50_ms"] == "" and back[4]["rel_l2_err"] == ""
    assert [r["pareto_front"] for r in back] == ["1", "0", "1", "0", "0", "0"]
    assert [r["best"] for r in back] == ["0", "0", "1", "0", "0", "0"]
    assert [r["reference"] for r in back] == ["0", "0", "0", "0", "0", "1"]


def test_write_report(jobs, tmp_path):
    paths = compare.write_report(jobs, tmp_path / "report", "sweep x")
    assert [p.name for p in paths] == ["comparison.md", "comparison.csv", "pareto.png", "stage_times.png"]
    for p in paths[2:]:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    # Nothing measured at all, or no jobs: the plots are still drawn.
    empty = compare.write_report(jobs[3:5], tmp_path / "none", "sweep y")
    assert all(p.stat().st_size > 1000 for p in empty[2:])


def test_import_loads_neither_matplotlib_nor_mlflow():
    code = ("import sys, pipeline.compare; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'mlflow', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# --- real jobs through `python -m pipeline.compare` ---------------------------------------

def compare_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.compare", *args], cwd=REPO,
                          env=clean_env(COLUMNS="250"), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_jobs(tiny_cache_as_built, tmp_path_factory):
    """Two runs in a store of their own, on a copy of the session's tiny_cnn cache: the onnxruntime job
    hits every stage but validate, and the eager job's entries stay out of the session's cache (a job
    there that expects to read the export program would hit eager's lowered one instead)."""
    tmp = tmp_path_factory.mktemp("compare")
    shutil.copytree(tiny_cache_as_built, tmp / "cache")
    jobs = [run_job(tmp, "target=onnxruntime", run_dir=tmp / "run0", cache=tmp / "cache"),
            run_job(tmp, "target=eager", run_dir=tmp / "run1", cache=tmp / "cache")]
    return tmp, jobs


def test_cli_compares_every_run(two_jobs):
    tmp, jobs = two_jobs
    assert [j.result.status for j in jobs] == ["FINISHED", "FINISHED"]
    proc = compare_cli("--store", str(tmp / "mlflow.db"), "--out", str(tmp / "report"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    for job in jobs:
        (row,) = [line for line in lines if f" {job.result.target} " in line]
        assert "FINISHED" in row
    assert "every run of experiment 'pipeline'" in proc.stdout
    assert sorted(p.name for p in (tmp / "report").iterdir()) == [
        "comparison.csv", "comparison.md", "pareto.png", "stage_times.png"]
    piped = {k: v for k, v in clean_env().items() if k != "COLUMNS"}  # 120 columns, as when piped
    narrow = subprocess.run([sys.executable, "-m", "pipeline.compare", "--store", str(tmp / "mlflow.db")], cwd=REPO,
                            env=piped, capture_output=True, text=True, timeout=120)
    wide = subprocess.run([sys.executable, "-m", "pipeline.compare", "--store", str(tmp / "mlflow.db"), "--wide"],
                          cwd=REPO, env=piped, capture_output=True, text=True, timeout=120)
    # --wide keeps every column in 120 (rich folds the long headers, "p99 ms" over two lines).
    assert "hidden: accel ops" in narrow.stdout and "hidden:" not in wide.stdout and "p99" in wide.stdout


def test_cli_compares_the_latest_sweep(two_jobs, tmp_path):
    """The two runs made children of a sweep, tagged as the sweep's jobs tag theirs."""
    store = tmp_path / "mlflow.db"
    shutil.copy(two_jobs[0] / "mlflow.db", store)
    settings = {"store": str(store), "experiment": "pipeline", "artifacts": str(tmp_path / "mlartifacts")}
    parent = sweeps.start_parent(settings, "s1", {"sweep.overrides": "target=onnxruntime,eager"})
    client = mlflow_client(uri=f"sqlite:///{store}")
    runs = sorted((r for r in mlflow_runs(client) if r.info.run_id != parent["run_id"]), key=lambda r: r.info.start_time)
    for number, run in enumerate(runs):
        for key, value in {"sweep.id": "s1", "sweep.job": str(number),
                           "sweep.overrides": f"target={run.data.tags['target']}"}.items():
            client.set_tag(run.info.run_id, key, value)
    sweeps.finish_parent(settings, parent["run_id"], "FINISHED", {}, {}, [])
    proc = compare_cli("--store", str(store), "--sweep", "latest")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("sweep s1") and f"parent run: {parent['run_id']} (FINISHED)" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert [line.split("│")[2].strip() for line in lines] == ["0", "1"]
    assert [line.split("│")[3].strip() for line in lines] == [f"target={r.data.tags['target']}" for r in runs]


def test_cli_errors_are_one_line(two_jobs, tmp_path):
    tmp, _ = two_jobs
    for args, what in ((("--store", str(tmp / "mlflow.db"), "--sweep", "nope"), "no sweep 'nope'"),
                       (("--store", str(tmp / "mlflow.db"), "--experiment", "nothing-here"), "no runs"),
                       (("--store", str(tmp_path / "missing.db"),), "no MLflow store at")):
        proc = compare_cli(*args)
        assert proc.returncode == 2, proc.stdout
        assert proc.stderr.startswith(f"error: {what}") and " — " in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "missing.db").exists()
