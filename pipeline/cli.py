"""One job as the user sees it: progress, a summary table, one-line errors, exit codes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import layout
from pipeline.errors import PipelineError, arm_signals, typed_line


def job_dir() -> tuple[Path, bool]:
    """The job's run folder, and whether it is one job of a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig) -> float | None:
    """One job; in a sweep a failure is recorded and returned as NaN so the sweep goes on."""
    from pipeline import sweep, targets, worker
    from pipeline.runner import Runner
    from pipeline.tracking import Tracker

    console = Console(record=True, highlight=False, soft_wrap=True)
    run_dir, in_sweep = job_dir()
    context = sweep.job_context(run_dir) if in_sweep else None
    debug = cfg.verbose or os.environ.get("PIPELINE_DEBUG") == "1"
    try:
        record_start(run_dir)
        arm_signals()  # a signal held while Hydra composed raises here, with the record there to say KILLED
        label_custom_model(cfg)
        runner = Runner(cfg, run_dir, console, sweep=context)  # resolves the target: no torch, no stage
        # The stage worker's server imports torch (and, in a sweep, what the target's jobs all redo) while
        # the runner checks the config and opens MLflow.
        worker.warm_up((*worker.SWEEP_PRELOAD, *targets.target_class(runner.target_name).sweep_preload)
                       if in_sweep else ())
        result = runner.run(Tracker(runner.config["tracking"]))
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM (errors.Terminated): recorded KILLED by the runner
        name = getattr(err, "signal_name", "SIGINT")
        record_end(run_dir, "KILLED", f"interrupted by {name}")
        console.print("[red]error:[/] " + escape(f"interrupted by {name}; the run is recorded KILLED ({run_dir})."))
        _save_log(console, run_dir)
        if debug:
            raise
        sys.exit(128 + getattr(signal, name))
    except Exception as err:
        if not isinstance(err, PipelineError) and not in_sweep:
            raise  # a bug: the traceback is the useful message
        line = err.one_line() if isinstance(err, PipelineError) else typed_line(err)
        if not getattr(err, "reported", False):  # the runner prints the errors it records
            console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        _save_log(console, run_dir)
        if debug:
            raise
        record_end(run_dir, "FAILED", line)  # failed before the runner took over the record
        if in_sweep:
            if sweep.is_search():
                raise  # the Optuna sweeper marks the trial failed (max_failure_rate lets the search go on)
            return sweep.failed_value()
        sys.exit(err.exit_code)
    print_summary(console, result)
    _save_log(console, run_dir)
    latency = result.metrics.get("latency_p50_ms")
    if latency is None and in_sweep:
        if sweep.is_search():
            raise PipelineError("the engines could not run here, so there is no latency to optimise.",
                                "search with targets whose engines run on this machine.")
        return sweep.failed_value()
    return latency


def record_start(run_dir: Path) -> None:
    """run.json (RUNNING, with this process's identity) from the job's first moment: a job killed while it
    still composes or checks is a record the next job closes, or one a signal turns KILLED."""
    from pipeline.files import write_json
    from pipeline.tracking.recovery import process_identity

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / layout.RUN_JSON, {"status": "RUNNING", "error": None, "target": None, "metrics": {},
                                               "process": process_identity()})
    except OSError:  # the runner's own checks name the folder that cannot be written, in one line
        pass


def record_end(run_dir: Path, status: str, error: str) -> None:
    """A job that ended before the runner took over its record (which writes its own): run.json says how."""
    from pipeline.files import load_json, write_json

    path = run_dir / layout.RUN_JSON
    try:
        record = load_json(path, "run record") if path.is_file() else {}
    except PipelineError:  # a damaged record: replaced
        record = {}
    if record.get("status", "RUNNING") == "RUNNING" and run_dir.is_dir():
        write_json(path, {"target": None, "metrics": {}, **record, "status": status, "error": error})


def label_custom_model(cfg: DictConfig) -> None:
    """model._target_ given without model.name: label runs by the factory, not by the preset it replaced."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    keys = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    if "model._target_" in keys and "model.name" not in keys:
        with open_dict(cfg):
            cfg.model.name = str(cfg.model._target_).rsplit(".", 1)[-1]


def _save_log(console: Console, run_dir: Path) -> None:
    if run_dir.is_dir():
        (run_dir / layout.CONSOLE_LOG).write_text(console.export_text(clear=False))


def print_summary(console: Console, result) -> None:
    table = Table(title=escape(f"{result.status.lower()}: {result.target}"), title_justify="left")
    for column in ("stage", "cache", "seconds"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for s in result.stages:
        table.add_row(s.name, "hit" if s.hit else "built", f"{s.seconds:.2f}")
    table.add_row("total", "", f"{result.wall_seconds:.2f}", style="bold")
    console.print(table)
    m = result.metrics
    console.print(
        f"partition: {m['num_accelerated_segments']:.0f} accelerated of {m['num_segments']:.0f} segments, "
        f"{m['accelerated_op_fraction']:.0%} of ops accelerated, engines {m['engine_bytes'] / 1e6:.1f} MB")
    if not m.get("validated"):
        console.print("[yellow]not validated[/]: the engines cannot run on this machine "
                      f"(see {escape(str(result.run_dir / 'validate' / 'report.json'))})")
    else:
        _print_measurements(console, m)
    for key, why in result.tags.items():  # what the target chose for this job's input, and why
        if key.endswith(".reason") and key[:-7] in result.tags:
            console.print(f"{key[:-7]}: {result.tags[key[:-7]]} ({why})", markup=False)
    if "gpu.index" in result.tags:  # the GPU this job leased (pipeline.gpu_lease)
        console.print(f"gpu: {result.tags['gpu.index']} ({result.tags.get('gpu.name', '?')}, "
                      f"{result.tags.get('gpu.uuid', 'uuid unknown')})", markup=False)
    console.print(f"artifacts: {result.run_dir}", markup=False)
    if result.tracking.get("recorded"):
        from pipeline.tracking import ui_link
        from pipeline.tracking.views import EXPERIMENT_VIEW

        t = result.tracking
        console.print(f"mlflow: run {t['run_id']} in experiment {t['experiment']!r} at {t['tracking_uri']}",
                      markup=False)
        console.print(f"  runs table: {ui_link(t['tracking_uri'], t['experiment_id'], view=EXPERIMENT_VIEW)}"
                      f"{'  (make ui serves it)' if t['tracking_uri'].startswith('sqlite') else ''}", markup=False)
        console.print(f"  this run:   {ui_link(t['tracking_uri'], t['experiment_id'], t['run_id'])}", markup=False)


def _print_measurements(console: Console, m: dict) -> None:
    top1 = f", top-1 agreement {m['top1_agreement']:.0%}" if "top1_agreement" in m else ""
    console.print(f"accuracy vs eager: max abs {m['max_abs_err']:.3g}, rel L2 {m['rel_l2_err']:.3g}, "
                  f"cosine {m['cosine_similarity']:.6f}{top1}")
    from pipeline.ranking import speedup_text, speedup_trusted

    noisy = "" if speedup_trusted(m) else " (~: too noisy to trust; see the warnings above)"
    console.print(f"latency p50 {m['latency_p50_ms']:.3f} ms (p99 {m['latency_p99_ms']:.3f}) vs eager "
                  f"{m['eager/latency_p50_ms']:.3f} ms: speedup {speedup_text(m)}, "
                  f"{m['throughput_per_s']:.1f}/s, {m.get('latency_threads', 0):.0f} thread(s) each{noisy}")
    from pipeline import payoff, task_metrics

    for line in [*task_metrics.summary_lines(m), payoff.summary_line(m)]:
        if line:
            console.print(line, markup=False, highlight=False)
