"""`python -m pipeline.compare`: the jobs of a sweep side by side, as a table, files and plots.

A sweep is run to choose a configuration, so the comparison puts every job in one row,
failed ones included (why a configuration failed is part of the answer), and marks the
Pareto front of latency against accuracy error: the only jobs worth choosing between.
Jobs whose engines cannot run on this machine (validated=0) say "n/m" instead of "-", so
"not measured here" is never read as "failed".

The inputs are job records (pipeline.tracking.sweeps.job_record, or the sweep's own from run
folders), so the same code serves the end of a sweep and the command line. matplotlib is
imported only to plot, and mlflow only by pipeline.tracking: the table stays quick.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline import gpu_lease
from pipeline.layout import STAGES
from pipeline.ranking import (  # noqa: F401  (pareto_front, shown_overrides, winner: the comparison's API)
    AXES,
    Job,
    accuracy_axis,
    engine_figure,
    engine_groups,
    is_reference,
    labels,
    measured_point,
    metric_value,
    pareto_front,
    shown_overrides,
    speedup_trusted,
    varying_overrides,
    winner,
    winner_line,
)

# Table column -> (metric, format); columns without a metric come from the record itself.
METRIC_COLUMNS = {
    "accel ops": ("accelerated_op_fraction", lambda v: f"{v:.1%}"),
    "engines": ("num_engines", lambda v: f"{v:.0f}"),
    "build s": ("build_seconds", lambda v: f"{v:.2f}"),
    "p50 ms": ("latency_p50_ms", lambda v: f"{v:.3f}"),
    "p99 ms": ("latency_p99_ms", lambda v: f"{v:.3f}"),
    "speedup": ("speedup", lambda v: f"{v:.2f}x"),
    "rel L2": ("rel_l2_err", lambda v: f"{v:.2e}"),
    "cosine": ("cosine_similarity", lambda v: f"{v:.6f}"),
    "top-1": ("top1_agreement", lambda v: f"{v:.0%}"),
    "task top-1": ("task/top1", lambda v: f"{v:.2f}%"),
    "drop": ("task/top1_drop", lambda v: f"{v:+.2f}"),
}
# Measured by validate: "n/m" rather than "-" when the engines could not run here.
MEASURED = ("p50 ms", "p99 ms", "speedup", "rel L2", "cosine", "top-1", "task top-1", "drop")
COLUMNS = ("job", "overrides", "target", "status", *METRIC_COLUMNS, "gpu", "error")
NOT_MEASURED = ("n/m: not measured (the engines cannot run on this machine); "
                "~: latency varies too much to trust (latency.trusted=false)")
FRONT_NOTE = ("best: the winner (the fastest trusted job with an engine that passed its accuracy check); "
              "*: on the Pareto front (no other job has lower p50 latency and lower error: task drop, else rel L2)")
REFERENCE_NOTE = "ref: no engine, everything ran in eager PyTorch: the yardstick, never a candidate"
STATUS_STYLES = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}


def short_error(error: str | None, limit: int = 80) -> str:
    """The problem without its fix, on one line: a table cell, not the full story (that is in the CSV)."""
    if not error:
        return "-"
    text = " ".join(error.split()).split(" Fix: ")[0]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def rows(jobs: list[Job]) -> list[dict[str, str]]:
    groups = engine_groups(jobs)
    out = []
    for label, job, overrides in zip(labels(jobs), jobs, varying_overrides(jobs), strict=True):
        not_measured = metric_value(job, "validated") == 0
        # Single runs carry no sweep overrides; their name (model-target) tells them apart.
        row = {"job": label, "overrides": overrides or job.get("name") or "-",
               "target": job.get("target") or "-", "status": job.get("status") or "-"}
        for column, (metric, fmt) in METRIC_COLUMNS.items():
            value = metric_value(job, metric)
            row[column] = "n/m" if value is None and not_measured and column in MEASURED else (
                "-" if value is None else fmt(value))
        if id(job) in groups:  # one engine measured several times: one figure and its spread
            for column in ("p50 ms", "speedup"):
                value, spread = engine_figure(job, jobs, METRIC_COLUMNS[column][0])
                if value is not None:
                    row[column] = f"{METRIC_COLUMNS[column][1](value)} ±{spread:.0%}"
        measured = groups.get(id(job), [job])  # a spread warning fired: nothing made of it may look quiet
        row["p50 ms"] += " ~" if row["p50 ms"] != "-" and any(metric_value(j, "latency_trusted") == 0 for j in measured) else ""
        row["speedup"] += " ~" if row["speedup"] not in ("-", "n/m") and not all(speedup_trusted(j.get("metrics") or {}) for j in measured) else ""
        cached = (job.get("tags") or {}).get("cache.build") == "hit" or metric_value(job, "build_cache_hit") == 1
        if metric_value(job, "build_seconds") is not None and cached:  # MLflow's tag, or run.json's metric
            row["build s"] = "hit"
        row["gpu"], row["error"] = gpu_lease.label(job), short_error(job.get("error"))
        out.append(row)
    return out


def marks(jobs: list[Job]) -> list[str]:
    """The first column: best for the winner, * for the Pareto front, ref for jobs without an engine."""
    best, _ = winner(jobs)
    front = {id(j) for j in pareto_front(jobs)}
    return ["best" if j is best else "*" if id(j) in front else "ref" if is_reference(j) else "" for j in jobs]


def notes(jobs: list[Job]) -> list[str]:
    """What the marks mean, and which jobs are one engine: printed under every table."""
    lines = [*gpu_lease.mixed(jobs), FRONT_NOTE, REFERENCE_NOTE, NOT_MEASURED]
    shared: dict[str, list[str]] = {}
    for label, job in zip(labels(jobs), jobs, strict=True):
        if id(job) in engine_groups(jobs):
            shared.setdefault(job["build_key"], []).append(label)
    for key, members in shared.items():
        lines.append(f"±: jobs {', '.join(members)} built one engine (build key {key[:12]}): their p50 and speedup "
                     "are one figure, the median of their measurements, ± half their range")
    return lines


# Columns left out of terminal tables narrower than WIDE (comparison.md and .csv keep them all).
SECONDARY = ("accel ops", "engines", "build s", "p99 ms", "top-1")
TASK_COLUMNS = ("task top-1", "drop")  # shown in terminal tables where some job measured a task metric
WIDE = 160


def table(jobs: list[Job], title: str, width: int | None = None) -> Table:
    """Cells, title and caption are Text: overrides and errors like `[aten.relu.default]` print as they are.

    In a narrow terminal (or 120 columns when piped) the secondary columns are left out, so
    the overrides and errors keep room to read instead of wrapping a few letters a line.
    """
    shown = gpu_lease.shown([c for c in COLUMNS if c not in TASK_COLUMNS or any(metric_value(j, METRIC_COLUMNS[c][0]) is not None for j in jobs)], jobs)
    columns = [c for c in shown if width is None or width >= WIDE or c not in SECONDARY]
    hidden = [c for c in shown if c not in columns]
    caption = "\n".join(notes(jobs))
    if hidden:
        caption += (f"\nhidden: {', '.join(hidden)} (terminal of {width} columns; COLUMNS={WIDE} or "
                    "python -m pipeline.compare --wide shows them all, as comparison.md and .csv do)")
    out = Table(title=Text(title), title_justify="left", caption=Text(caption), caption_justify="left")
    out.add_column("")
    for column in columns:
        numeric = column in METRIC_COLUMNS or column == "job"
        out.add_column(column, justify="right" if numeric else "left", overflow="fold",
                       no_wrap=numeric or column in ("target", "status"),
                       min_width=20 if column == "overrides" else None)
    for mark, row in zip(marks(jobs), rows(jobs), strict=True):
        cells = [Text(row[c], style=STATUS_STYLES.get(row[c], "") if c == "status" else "") for c in columns]
        out.add_row(mark, *cells, style="bold" if mark in ("best", "*") else None)
    return out


# The parent run's description: the columns that pick a winner. MLflow renders it as an HTML
# table sized by its content, so these fit its pane; the other figures are in comparison.md/.csv.
NOTE_COLUMNS = ("job", "overrides", "target", "status", "p50 ms", "speedup", "rel L2", "top-1", "task top-1", "drop")
# comparison.md: the figures that pick a winner first (what MLflow's pane shows before it
# scrolls sideways), the long overrides after them; errors follow the table in full.
REPORT_COLUMNS = ("job", "target", "status", "p50 ms", "speedup", "rel L2", "top-1", "task top-1", "drop",
                  "overrides", "cosine", "p99 ms", "accel ops", "engines", "build s", "gpu")


def _md_cell(text: str) -> str:
    """A table cell as text, not markup: `[aten.relu.default]`, `__init__` or `a|b` print as they are."""
    text = re.sub(r"([\\`*<>\[\]|])", r"\\\1", " ".join(str(text).split()))
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)  # min_block_size stays as it is


def _failures(jobs: list[Job]) -> list[str]:
    """Every failed job's full error, fix included: prose that wraps to any pane, escaped so it is never markup."""
    failed = [(label, j, o) for label, j, o in zip(labels(jobs), jobs, varying_overrides(jobs), strict=True) if j.get("error")]
    lines = ["", "Errors of the failed jobs, in full:", ""] if failed else []
    for label, job, overrides in failed:
        lines.append(f"- job {label}" + (f" ({_md_cell(overrides)})" if overrides else "") + f": {_md_cell(job['error'])}")
    return lines


def markdown(jobs: list[Job], title: str) -> str:
    """comparison.md: the table as aligned text in a code block, then every failed job's full error.

    MLflow's artifact pane draws a markdown table with equal-width columns: 15 columns in
    its ~500-pixel pane left a few letters a line (`compil/e.min/_block/...`). A code
    block keeps each job on one line (the pane scrolls sideways) and reads the same in a terminal.
    """
    columns = gpu_lease.shown(REPORT_COLUMNS, jobs)
    grid = [("", *columns)] + [(mark, *(row[c] for c in columns)) for mark, row in zip(marks(jobs), rows(jobs), strict=True)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    right = [c == "job" or c in METRIC_COLUMNS for c in ("", *columns)]

    def text(cells) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    lines = [f"## {title}", "", f"**{_md_cell(winner_line(jobs))}**", "", "```text", text(grid[0]),
             text(["-" * w for w in widths]), *map(text, grid[1:]), "```", ""]
    return "\n".join([*lines, *(x for n in notes(jobs) for x in (n, "")), *_failures(jobs), ""])


def note(jobs: list[Job], title: str, run_link=None) -> str:
    """The parent run's description: a compact markdown table (job numbers link to their runs), full errors.

    run_link(run_id) gives a job's link in the MLflow UI; without it job numbers are plain.
    """
    def line(cells) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [f"**{_md_cell(winner_line(jobs))}**", "", f"## {_md_cell(title)}", "", line(("", *NOTE_COLUMNS)),
             line(["---"] * (len(NOTE_COLUMNS) + 1))]
    for job, mark, row in zip(jobs, marks(jobs), rows(jobs), strict=True):
        cells = {c: _md_cell(row[c]) for c in NOTE_COLUMNS}
        if run_link and job.get("run_id"):
            cells["job"] = f"[{cells['job']}]({run_link(job['run_id'])})"
        lines.append(line((_md_cell(mark), *cells.values())))
    return "\n".join([*lines, "", *(x for n in notes(jobs) for x in (_md_cell(n), "")), *_failures(jobs), ""])


def write_csv(jobs: list[Job], path: Path) -> Path:
    """Raw values under metric names, for pandas or a spreadsheet; every metric any job has."""
    first = [metric for metric, _ in METRIC_COLUMNS.values()] + ["validated", "accuracy_passed"]
    first += [f"{s}_seconds" for s in STAGES if f"{s}_seconds" not in first]
    seen = {k for j in jobs for k in (j.get("metrics") or {})}
    metrics = list(dict.fromkeys(first)) + sorted(seen - set(first))
    front = {id(j) for j in pareto_front(jobs)}
    best, _ = winner(jobs)
    fields = ["job", "name", "run_id", "overrides", "target", "status", "pareto_front", "best", "reference",
              *metrics, "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for label, job in zip(labels(jobs), jobs, strict=True):
            values = job.get("metrics") or {}
            writer.writerow({**{k: job.get(k) or "" for k in fields[1:6] + ["error"]}, "job": label,
                             "pareto_front": int(id(job) in front), "best": int(job is best),
                             "reference": int(is_reference(job)),
                             **{m: repr(float(values[m])) if m in values else "" for m in metrics}})
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit imported
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


def _log_axis(axis, set_scale) -> None:
    """A log axis labelled 0.2, 0.5, 1, 2, 5 ms: matplotlib's own minor labels (3x10^-1 4x10^-1) overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    set_scale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_pareto(jobs: list[Job], path: Path, title: str = "latency against accuracy error") -> Path:
    plt = _pyplot()
    names = dict(zip(map(id, jobs), labels(jobs), strict=True))
    axis = accuracy_axis(jobs)
    measured = [j for j in jobs if measured_point(j, axis)]
    failed = sum(j.get("status") != "FINISHED" for j in jobs)
    unmeasured = len(jobs) - len(measured) - failed
    fig, ax = plt.subplots(figsize=(8, 5.5))
    engines = [j for j in measured if not is_reference(j)]
    targets = sorted({j.get("target") or "?" for j in engines})
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(targets)}
    for target in targets:
        xs, ys = zip(*(measured_point(j, axis) for j in engines if (j.get("target") or "?") == target), strict=True)
        ax.scatter(xs, ys, color=colours[target], label=target, zorder=3)
    references = [measured_point(j, axis) for j in measured if is_reference(j)]
    if references:
        xs, ys = zip(*references, strict=True)
        ax.scatter(xs, ys, color="grey", marker="x", label="reference (no engine: eager PyTorch)", zorder=3)
    best, _ = winner(jobs)
    if best is not None and measured_point(best, axis):
        ax.scatter(*measured_point(best, axis), s=420, marker="*", color="gold", edgecolors="black",
                   label=f"best: job {names[id(best)]}", zorder=5)
    # Labels of nearby points take turns around them instead of printing over each other.
    offsets = ((5, 4), (5, -11), (-14, 4), (-14, -11))
    for i, j in enumerate(sorted(measured, key=lambda j: measured_point(j, axis))):
        ax.annotate(names[id(j)], measured_point(j, axis), textcoords="offset points", xytext=offsets[i % len(offsets)], fontsize=8)
    front = pareto_front(jobs)
    if front:
        xs, ys = zip(*(measured_point(j, axis) for j in front), strict=True)
        ax.step(xs, ys, where="post", color="grey", linestyle="--", zorder=2)
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", label="Pareto front", zorder=4)
    positive = [measured_point(j, axis)[1] for j in measured if measured_point(j, axis)[1] > 0]
    if len(positive) >= 2 and max(positive) >= 100 * min(positive):
        # Exact results (eager: error 0) have no place on a log axis; symlog keeps them at 0.
        exact = len(positive) < len(measured)
        ax.set_yscale("symlog" if exact else "log", **({"linthresh": min(positive)} if exact else {}))
    latencies = [measured_point(j, axis)[0] for j in measured]
    if latencies and min(latencies) > 0 and max(latencies) >= 10 * min(latencies):
        _log_axis(ax.xaxis, ax.set_xscale)  # CPU and GPU engines, or batch 1 and 32, on one readable axis
    if measured:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no job was measured", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="latency p50 (ms)", ylabel=AXES[axis])
    ax.set_title(f"{title}\n{len(jobs) - len(measured)} of {len(jobs)} jobs left out ({failed} failed, "
                 f"{unmeasured} not measured)", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_stage_times(jobs: list[Job], path: Path, title: str = "stage times") -> Path:
    plt = _pyplot()
    names = [f"{label} {j.get('target') or ''}" + ("" if j.get("status") == "FINISHED" else f" ({j.get('status')})")
             for label, j in zip(labels(jobs), jobs, strict=True)]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.35 * max(len(jobs), 1)))
    left = [0.0] * len(jobs)
    for stage in STAGES:
        widths = [metric_value(j, f"{stage}_seconds") or 0.0 for j in jobs]
        ax.barh(range(len(jobs)), widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(jobs)), names, fontsize=8)
    ax.invert_yaxis()  # job 0 on top, as in the table
    ax.set_xlabel("seconds (cache hits take almost none)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncols=len(STAGES), loc="upper center", bbox_to_anchor=(0.5, -0.15 - 1 / (len(jobs) + 4)))
    return _save(fig, path)


def write_report(jobs: list[Job], out_dir: Path, title: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(markdown(jobs, title))
    return [out_dir / "comparison.md", write_csv(jobs, out_dir / "comparison.csv"),
            plot_pareto(jobs, out_dir / "pareto.png", f"{title}: latency against accuracy error"),
            plot_stage_times(jobs, out_dir / "stage_times.png", f"{title}: stage times")]


# --- command line -------------------------------------------------------------------------

def fail(what: str, fix: str) -> NoReturn:
    print(f"error: {what} — {fix}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    from pipeline.cache.cli import Parser
    from pipeline.config import PathsConfig, TrackingConfig
    from pipeline.tracking import experiment_name, sweeps, tracking_uri

    store, artifacts = (p.replace("${paths.outputs}", PathsConfig.outputs)
                        for p in (TrackingConfig.store, TrackingConfig.artifacts))
    cli = Parser(prog="python -m pipeline.compare", description="Compare the jobs of a sweep, or every run.")
    cli.add_argument("--sweep", metavar="ID|latest", help="one sweep's jobs, or the newest sweep's (default: every run)")
    cli.add_argument("--experiment", help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME or pipeline)")
    cli.add_argument("--store", help=f"the MLflow SQLite file (default: MLFLOW_TRACKING_URI or {store})")
    cli.add_argument("--out", type=Path, metavar="DIR", help="also write comparison.md, .csv and plots there")
    cli.add_argument("--wide", action="store_true", help="every column, however narrow the terminal")
    args = cli.parse_args(argv)
    if args.store:  # an explicit flag beats the environment
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    settings = {"store": args.store or store, "experiment": TrackingConfig.experiment, "artifacts": artifacts}
    uri, experiment = tracking_uri(settings), args.experiment or experiment_name(settings)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        fail(f"no MLflow store at {uri.removeprefix('sqlite:///')}",
             "run a job first, or pass --store PATH (or set MLFLOW_TRACKING_URI)")
    try:
        parent, jobs = sweeps.load_jobs(settings, args.sweep, experiment)
    except Exception as err:  # a store MLflow cannot read: say so in one line, like every other error
        if os.environ.get("PIPELINE_DEBUG") == "1":
            raise
        fail(f"could not read the MLflow store at {uri}: {' '.join(str(err).split())[:300]}",
             "check --store or MLFLOW_TRACKING_URI (PIPELINE_DEBUG=1 shows the traceback)")
    sweep_id = parent["tags"].get("sweep.id") if parent else args.sweep
    where = f"in experiment {experiment!r} at {uri}"
    if not jobs and args.sweep and parent is None:
        fail(f"no sweep {'at all' if args.sweep == 'latest' else repr(args.sweep)} {where}",
             "pass a sweep.id tag shown in the MLflow UI (make ui), or leave out --sweep to compare every run")
    if not jobs:
        fail(f"sweep {sweep_id!r} has no jobs {where}" if sweep_id else f"no runs {where}",
             "run a job first, or pass --experiment NAME / --store PATH")
    title = f"sweep {sweep_id}" if sweep_id else f"every run of experiment {experiment!r}"
    # The terminal's width, or 120 columns when piped: cells wrap inside the table, never past it.
    console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120)
    console.print(table(jobs, title, None if args.wide else console.width))
    if parent:
        console.print(f"parent run: {parent['run_id']} ({parent['status']})", markup=False)
    if args.out:
        console.print("report: " + ", ".join(map(str, write_report(jobs, args.out, title))), markup=False)


if __name__ == "__main__":
    main()
