"""The batch with the most throughput under a p99 latency budget (Model Navigator's strategy).

Batches are timed upwards (powers of two from the batch dim's min to its max, or the
ones asked for) on one engine, the one validate loaded: the batch dim is dynamic, so no
batch needs a build of its own. The budget is on host latency (enqueue and wait), what a
caller waiting on each call sees; throughput is samples per second at that latency. The
search stops at the first batch whose p99 passes the budget (a larger batch only takes
longer) or that does not fit in memory; the chosen batch is the fastest one within it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.timing import LatencyStats


def batch_dim(input_cfg) -> str | None:
    """The first input's first size where it names a dimension of input.dims that varies, else None."""
    first = input_cfg.tensors[0].shape[0] if input_cfg.tensors and input_cfg.tensors[0].shape else None
    dims = input_cfg.get("dims") or {}
    if isinstance(first, str) and first in dims and dims[first]["min"] != dims[first]["max"]:
        return first
    return None


def batches(low: int, high: int, asked: list[int]) -> list[int]:
    """The batches to time, ascending: those asked for inside [low, high], else powers of two and `high`."""
    if asked:
        return sorted({int(b) for b in asked if low <= int(b) <= high})
    out, b = [low], 1
    while b <= high:
        if b > low:
            out.append(b)
        b *= 2
    return sorted(set(out) | {high})


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def search(time_at: Callable[[int], LatencyStats], sizes: list[int], budget_ms: float,
           on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time each batch in order until one passes the budget or runs out of memory; pick the fastest within."""
    curve: list[dict[str, Any]] = []
    stopped = "every batch was timed"
    for batch in sizes:
        try:
            stats = time_at(batch)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            stopped = f"batch {batch} ran out of memory"
            break
        point = {"batch": batch, "throughput_per_s": round(stats.throughput_per_s, 3),
                 "p50_ms": round(stats.host_p50_ms, 4), "p99_ms": round(stats.host_p99_ms, 4),
                 "gpu_p50_ms": round(stats.p50_ms, 4), "median_spread": round(stats.median_spread, 4)}
        curve.append(point)
        if on_point:
            on_point(point)
        if stats.host_p99_ms > budget_ms:
            stopped = f"batch {batch}'s p99 {stats.host_p99_ms:.3f} ms passed the {budget_ms:g} ms budget"
            break
    within = [p for p in curve if p["p99_ms"] <= budget_ms]
    best = max(within, key=lambda p: p["throughput_per_s"], default=None)
    return {"p99_budget_ms": budget_ms, "curve": curve, "chosen_batch": best["batch"] if best else None,
            "chosen": best, "stopped": stopped}


def table(result: dict[str, Any]) -> str:
    """The curve as text: one row per batch, the chosen one marked."""
    rows = [f"throughput vs batch (p99 budget {result['p99_budget_ms']:g} ms; {result['stopped']}):",
            f"  {'batch':>6} {'samples/s':>12} {'p50 ms':>9} {'p99 ms':>9}"]
    for p in result["curve"]:
        mark = "  <- chosen" if p["batch"] == result["chosen_batch"] else (
            "  over budget" if p["p99_ms"] > result["p99_budget_ms"] else "")
        rows.append(f"  {p['batch']:>6} {p['throughput_per_s']:>12.1f} {p['p50_ms']:>9.3f} {p['p99_ms']:>9.3f}{mark}")
    chosen = result["chosen_batch"]
    rows.append(f"chosen batch: {chosen}" if chosen is not None else "chosen batch: none (no batch met the budget)")
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Path, title: str) -> Path:
    """Throughput and p99 against batch, the budget and the chosen batch marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["batch"] for p in result["curve"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [p["throughput_per_s"] for p in result["curve"]], "o-", color="tab:blue", label="throughput")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("samples/s", color="tab:blue")
    other = ax.twinx()
    other.plot(xs, [p["p99_ms"] for p in result["curve"]], "s--", color="tab:red", label="p99")
    other.axhline(result["p99_budget_ms"], color="tab:red", linewidth=0.8, linestyle=":")
    other.set_ylabel("p99 ms", color="tab:red")
    if result["chosen_batch"] is not None:
        ax.axvline(result["chosen_batch"], color="gray", linewidth=0.8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
