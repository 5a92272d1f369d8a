"""Which jobs of a sweep are worth choosing, and which one wins.

A sweep is run to pick a configuration, so the verdict must not pick on noise: jobs that
built one engine (one build key) are one measurement, jobs without an engine are the
yardstick rather than candidates, and a sweep whose every candidate is noisy names no
winner. The comparison tables, the plots, the parent run's description and the runs-table
marks all take their verdict from here, so they never disagree.
"""

from __future__ import annotations

import math
from typing import Any

Job = dict[str, Any]


def labels(jobs: list[Job]) -> list[str]:
    """Sweep job numbers; positions when they are missing or repeat (every run of an experiment)."""
    numbers = [j.get("job") for j in jobs]
    if None not in numbers and len(set(numbers)) == len(numbers):
        return [str(n) for n in numbers]
    return [str(i) for i in range(len(jobs))]


def metric_value(job: Job, metric: str) -> float | None:
    value = (job.get("metrics") or {}).get(metric)
    return None if value is None else float(value)


# The accuracy axis: the task metric's drop where every measured job has one (pipeline.task_metrics),
# else rel L2 against eager on the validation inputs.
AXES = {"task/top1_drop": "task top-1 drop vs eager fp32 (points)",
        "task/cosine_mean_drop": "task per-sample cosine drop vs eager fp32 (points)",
        "rel_l2_err": "rel L2 error vs eager PyTorch"}


def accuracy_axis(jobs: list[Job]) -> str:
    finished = [j for j in jobs if j.get("status") == "FINISHED" and metric_value(j, "latency_p50_ms") is not None]
    return next((m for m in AXES if finished and all(metric_value(j, m) is not None for j in finished)), "rel_l2_err")


def measured_point(job: Job, axis: str = "rel_l2_err") -> tuple[float, float] | None:
    """(latency p50, accuracy error on `axis`) of a finished job that measured both; NaN errors are no measurement."""
    x, y = metric_value(job, "latency_p50_ms"), metric_value(job, axis)
    if job.get("status") != "FINISHED" or x is None or y is None or not math.isfinite(x + y):
        return None
    return x, y


# Overrides that say where files go, not what was built: never shown to users.
HIDDEN_OVERRIDES = ("paths.", "hydra.", "tracking.")


def shown_overrides(text: str | None) -> str:
    """A job's overrides as a user reads them: without output paths and launcher settings."""
    return " ".join(t for t in (text or "").split() if not t.lstrip("+~").startswith(HIDDEN_OVERRIDES))


def varying_overrides(jobs: list[Job]) -> list[str]:
    """Each job's overrides less those every job shares: what tells the rows apart."""
    tokens = [shown_overrides(j.get("overrides")).split() for j in jobs]
    common = set.intersection(*map(set, tokens)) if len(jobs) > 1 and all(tokens) else set()
    return [" ".join(t for t in ts if t not in common) for ts in tokens]


def is_reference(job: Job) -> bool:
    """A job with no engine: everything ran in eager PyTorch (target=eager, or no block big enough).

    Its error is 0 by definition and its speedup is eager against eager: a yardstick, never a
    candidate for the Pareto front or the winner.
    """
    return metric_value(job, "num_engines") == 0


def engine_groups(jobs: list[Job]) -> dict[int, list[Job]]:
    """id(job) -> the jobs that built the very same engine (one build key), for jobs that share one."""
    by_key: dict[str, list[Job]] = {}
    for job in jobs:
        if job.get("build_key") and job.get("status") == "FINISHED":
            by_key.setdefault(job["build_key"], []).append(job)
    return {id(j): group for group in by_key.values() if len(group) > 1 for j in group}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def engine_figure(job: Job, jobs: list[Job], metric: str) -> tuple[float | None, float]:
    """A metric of the job's engine: its own value, or the median over jobs of one build key and their spread.

    Jobs with one build key ran one engine: their latencies differ by noise only, so they
    are one figure (the median) with a spread (half the range, relative to it).
    """
    group = engine_groups(jobs).get(id(job))
    values = [v for v in (metric_value(j, metric) for j in (group or [job])) if v is not None and math.isfinite(v)]
    if not values:
        return None, 0.0
    middle = _median(values)
    spread = (max(values) - min(values)) / 2 / middle if middle else 0.0
    return middle, spread


def candidates(jobs: list[Job]) -> list[Job]:
    """Jobs that may win: finished, measured, accurate enough, and with an engine."""
    return [j for j in jobs if j.get("status") == "FINISHED" and metric_value(j, "validated")
            and metric_value(j, "accuracy_passed") and metric_value(j, "latency_p50_ms") is not None and not is_reference(j)]


def winner(jobs: list[Job]) -> tuple[Job | None, str]:
    """The fastest candidate whose latency can be trusted, or None and why no winner is named.

    A sweep whose candidates are all noisy names none: ranking noise would pick a
    configuration at random and present it as a finding.
    """
    able = candidates(jobs)
    if not able:
        reason = ("only reference jobs (no engine) were measured" if any(is_reference(j) for j in jobs)
                  else "no job finished, was measured and passed its accuracy check")
        return None, reason
    trusted = [j for j in able if metric_value(j, "latency_trusted") != 0]
    if not trusted:
        return None, (f"the latency of every candidate ({len(able)}) varies too much to trust (~), so no winner "
                      "is named on noise: quiet the machine or raise validate.iterations, then run it again")
    return min(trusted, key=lambda j: (engine_figure(j, jobs, "latency_p50_ms")[0], j.get("job") or 0)), ""


def winner_line(jobs: list[Job]) -> str:
    """The first line of a sweep's verdict: the winner with its deciding figures rounded, or why there is none."""
    best, reason = winner(jobs)
    if best is None:
        return f"No winner: {reason}."
    label = dict(zip(map(id, jobs), labels(jobs), strict=True))[id(best)]
    what = dict(zip(map(id, jobs), varying_overrides(jobs), strict=True))[id(best)] or best.get("name") or ""
    p50, _ = engine_figure(best, jobs, "latency_p50_ms")
    speedup, _ = engine_figure(best, jobs, "speedup")
    parts = [f"p50 {p50:.3g} ms"] + ([f"{speedup:.3g}x eager"] if speedup else [])
    error = metric_value(best, "rel_l2_err")
    if error is not None:
        parts.append(f"rel L2 {error:.1e}")
    target = f" on {best['target']}" if best.get("target") and best["target"] not in what else ""
    return f"Winner: job {label} ({what}{target}): " + ", ".join(parts) + "."


def pareto_front(jobs: list[Job]) -> list[Job]:
    """Measured jobs with engines no other beats on both latency and error, fastest first (the plot's step line)."""
    axis = accuracy_axis(jobs)
    points = [(*measured_point(j, axis), j) for j in jobs if measured_point(j, axis) and not is_reference(j)]
    front = [(x, y, j) for x, y, j in points
             if not any(a <= x and b <= y and (a < x or b < y) for a, b, _ in points)]
    return [j for _, _, j in sorted(front, key=lambda p: (p[0], p[1]))]


def speedup_text(metrics: dict[str, Any]) -> str:
    """A job's speedup as its summary line and its MLflow tag print it: ` ~` after it, as in the tables,
    when a latency behind it, the engine's or eager's, varied too much to trust (speedup_trusted=0; runs
    recorded before it existed: latency_trusted), so a noisy 900x never reads like a measured one."""
    value = metrics.get("speedup")
    if value is None:
        return "-"
    return f"{float(value):.2f}x" + (" ~" if not speedup_trusted(metrics) else "")


def speedup_trusted(metrics: dict[str, Any]) -> bool:
    return metrics.get("speedup_trusted", metrics.get("latency_trusted")) != 0
