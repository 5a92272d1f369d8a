"""Latency measured the way trtexec does: GPU compute time apart from host latency, judged by rounds.

Candidates are timed in interleaved rounds (A, B, A, B, ...) in one process so a change
of clock speed or background load hits all of them alike. On a GPU each call is
bracketed by CUDA events (GPU compute time, trtexec's "GPU Compute Time") and by the
host's clock from before the enqueue to after the wait (trtexec's "Latency": enqueue
and wait included); on the CPU both are the monotonic clock, with nothing asynchronous
left running. Every call's sample is kept, so p50/p90/p99 are read from real calls.

Trust is judged by how stable the median is across rounds, not by the per-call spread:
sub-millisecond GPU calls carry host jitter that no quiet machine removes (coefficients
of variation of 20-30% on an idle H200) while their medians repeat within a percent. A
machine whose load comes and goes moves the rounds' medians apart, and is flagged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    a = np.asarray(ms, dtype=np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(np.percentile(a, 99))


def median_spread(rounds: list[list[float]]) -> tuple[list[float], float]:
    """The rounds' medians and their spread: their interquartile range over their median (0 for one round).

    One round in five hit by a passing hiccup does not move it (seen on an H200: four rounds
    at 0.468 ms, one at 0.542); load that lasts two rounds or more does.
    """
    medians = [float(np.median(r)) for r in rounds if r]
    if len(medians) < 2:
        return medians, 0.0
    middle = float(np.median(medians))
    q1, q3 = np.percentile(medians, [25, 75])
    return medians, float(q3 - q1) / middle if middle else 0.0


@dataclass
class LatencyStats:
    # GPU compute time on a GPU (CUDA events), the host's clock on the CPU.
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    cv: float
    iterations: int
    throughput_per_s: float
    # Host latency: enqueue and wait, wall clock (the same samples as above on the CPU).
    host_p50_ms: float = 0.0
    host_p90_ms: float = 0.0
    host_p99_ms: float = 0.0
    host_mean_ms: float = 0.0
    # The median of each round and their spread (interquartile range / median): what trust is judged by.
    round_medians_ms: list[float] = field(default_factory=list)
    median_spread: float = 0.0

    @classmethod
    def from_samples(cls, ms: list[float], batch_size: int, host_ms: list[float] | None = None,
                     rounds: list[list[float]] | None = None) -> LatencyStats:
        a = np.asarray(ms, dtype=np.float64)
        host = np.asarray(host_ms if host_ms is not None else ms, dtype=np.float64)
        mean = float(a.mean())
        std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
        p50, p90, p99 = percentiles(ms)
        h50, h90, h99 = percentiles(list(host))
        medians, spread = median_spread(rounds if rounds is not None else [list(ms)])
        host_mean = float(host.mean())
        return cls(p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=mean, std_ms=std,
                   min_ms=float(a.min()), max_ms=float(a.max()), cv=std / mean if mean else 0.0,
                   iterations=len(a), throughput_per_s=batch_size * 1000.0 / host_mean if host_mean else 0.0,
                   host_p50_ms=h50, host_p90_ms=h90, host_p99_ms=h99, host_mean_ms=host_mean,
                   round_medians_ms=[round(m, 6) for m in medians], median_spread=spread)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _time_block(fn: Callable[[], object], n: int, cuda: bool) -> tuple[list[float], list[float]]:
    """(compute ms, host ms) of `n` calls each.

    On a GPU, compute: the calls queued back to back with CUDA events around each (trtexec's
    GPU compute time: waiting after every call would add the host's wake-up to the next call);
    host: `n` more calls, each enqueued and waited for, on the host's clock.
    """
    if cuda:
        import torch

        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        host = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            fn()
            torch.cuda.synchronize()
            host.append((time.perf_counter_ns() - t0) / 1e6)
        return [s.elapsed_time(e) for s, e in events], host
    host = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        host.append((time.perf_counter_ns() - t0) / 1e6)
    return host, host


def warm(fn: Callable[[], object], calls: int, seconds: float, cuda: bool) -> float:
    """Run `calls` calls and at least `seconds` (GPU clocks ramp up under load); the mean ms of a call."""
    started, done = time.perf_counter(), 0
    while done < calls or time.perf_counter() - started < seconds:
        _time_block(fn, 1, cuda)
        done += 1
    return (time.perf_counter() - started) * 1000.0 / max(done, 1)


def measure(candidates: dict[str, Callable[[], object]], *, warmup: int, iterations: int, rounds: int,
            min_seconds: float, batch_size: int, cuda: bool, round_seconds: float = 0.0,
            on_progress: Callable[[int], None] | None = None) -> dict[str, LatencyStats]:
    """Latency of each candidate over at least `iterations` calls, `rounds` rounds and `min_seconds` seconds.

    `round_seconds`: each round lasts about this long at least (more calls per round for fast
    candidates), so that one passing hiccup cannot move a round's median.
    """
    rounds = max(1, min(rounds, iterations))
    per_round = {name: -(-iterations // rounds) for name in candidates}  # ceil: at least `iterations` samples
    for name, fn in candidates.items():
        ms = warm(fn, warmup, round_seconds, cuda)
        if round_seconds and ms > 0:
            per_round[name] = max(per_round[name], int(round_seconds * 1000.0 / ms))
    blocks: dict[str, list[tuple[list[float], list[float]]]] = {name: [] for name in candidates}
    done = 0
    while done < rounds or any(sum(sum(b[1]) for b in s) / 1000.0 < min_seconds for s in blocks.values()):
        for name, fn in candidates.items():
            blocks[name].append(_time_block(fn, per_round[name], cuda))
        done += 1
        if on_progress:
            on_progress(done)
    return {name: LatencyStats.from_samples([x for b in bs for x in b[0]], batch_size,
                                            host_ms=[x for b in bs for x in b[1]], rounds=[b[0] for b in bs])
            for name, bs in blocks.items()}


def physical_cores(cpus: set[int]) -> int:
    """Distinct physical cores among the logical CPUs `cpus` (hyper-threads of one core count once)."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _cpu_ticks(cpus: set[int]) -> tuple[int, int]:
    """(idle, total) jiffies of the logical CPUs `cpus`, from /proc/stat."""
    idle = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                idle += values[3] + values[4]  # idle + iowait
                total += sum(values)
    return idle, total


def idle_cpus(cpus: set[int], seconds: float = 0.3) -> float | None:
    """How many of `cpus` sat idle over the last `seconds` (None where /proc/stat cannot tell)."""
    try:
        idle0, total0 = _cpu_ticks(cpus)
        time.sleep(seconds)
        idle1, total1 = _cpu_ticks(cpus)
    except (OSError, ValueError):
        return None
    return len(cpus) * (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def thread_budget(asked: int) -> tuple[int, str]:
    """(threads, why): the CPU threads eager PyTorch and the engines both get while timed.

    `asked` > 0 is taken as it is. 0 (auto) is the physical cores this process may run on
    (its CPU affinity), less those other work keeps busy right now: a thread without a core
    of its own waits a scheduler slice at each parallel region's barrier, which made eager
    tiny_cnn 16-80x slower at 2 threads than at 1 on this 2-core machine under load, while
    ONNX Runtime (which runs small ops on the calling thread) hardly moved.
    """
    if asked > 0:
        return asked, f"validate.threads={asked}"
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = physical_cores(cpus)
    idle = idle_cpus(cpus)
    if idle is None:
        return cores, f"auto: {cores} physical core(s) available"
    threads = max(1, min(cores, round(idle)))
    return threads, f"auto: {cores} physical core(s) available, {idle:.1f} of {len(cpus)} CPU(s) idle"


def allocated_mb(device: str) -> float:
    """What torch's allocator holds on the GPU now (0 on the CPU)."""
    if device != "cuda":
        return 0.0
    import torch

    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**20


def outside_torch_mb(device: str) -> float:
    """GPU memory in use that torch's allocator did not reserve (ONNX Runtime's arena, TensorRT), MB.

    The device's used memory (cudaMemGetInfo) less what torch reserved; differences of it
    over a load or a call are what other allocators took, which torch's counters never see.
    """
    if device != "cuda":
        return 0.0
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / 2**20


def transient_peak_mb(fn: Callable[[], object]) -> float:
    """What one call allocates on top of what was resident, at its peak (torch's allocator), MB.

    Other allocators keep what a call took (ONNX Runtime's arena grows and holds): validate
    adds their growth since loading, from outside_torch_mb.
    """
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured once in a CUDA graph and replayed (trtexec's --useCudaGraph): launch costs gone.

    Warmed up on a side stream first, as capture requires; raises if `fn` cannot be captured
    (host synchronisation, CPU work, a module that already replays graphs of its own).
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
