"""pipeline.timing: statistics on known numbers, and the interleaved measuring loop."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time

import pytest

from pipeline.config import ValidateConfig
from pipeline.timing import LatencyStats, measure, median_spread, physical_cores, thread_budget


def test_from_samples_on_one_to_hundred():
    samples = [float(i) for i in range(1, 101)]
    s = LatencyStats.from_samples(samples, batch_size=4)
    # Linear interpolation between order statistics: rank q*(n-1).
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.mean_ms == pytest.approx(50.5)
    assert s.std_ms == pytest.approx(statistics.stdev(samples))  # sample std (n-1)
    assert s.std_ms == pytest.approx(math.sqrt(100 * 101 / 12))
    assert s.cv == pytest.approx(statistics.stdev(samples) / 50.5)
    assert (s.min_ms, s.max_ms, s.iterations) == (1.0, 100.0, 100)
    assert s.throughput_per_s == pytest.approx(4 * 1000.0 / 50.5)  # items per second at the mean


def test_from_samples_small_set_and_order_independence():
    samples = [9.0, 2.0, 5.0, 4.0, 7.0, 4.0, 5.0, 4.0]
    s = LatencyStats.from_samples(samples, batch_size=1)
    assert s.p50_ms == pytest.approx(4.5)
    assert s.p90_ms == pytest.approx(7.6)  # rank 6.3 between 7 and 9
    assert s.mean_ms == pytest.approx(5.0)
    assert s.std_ms == pytest.approx(math.sqrt(32 / 7))
    assert s.cv == pytest.approx(math.sqrt(32 / 7) / 5.0)
    assert s.throughput_per_s == pytest.approx(200.0)
    assert LatencyStats.from_samples(sorted(samples), batch_size=1) == s


def test_from_samples_single_sample_has_no_spread():
    s = LatencyStats.from_samples([3.0], batch_size=2)
    assert (s.p50_ms, s.p90_ms, s.p99_ms, s.std_ms, s.cv) == (3.0, 3.0, 3.0, 0.0, 0.0)
    assert s.throughput_per_s == pytest.approx(2000.0 / 3.0)


def test_as_dict_has_every_field():
    d = LatencyStats.from_samples([1.0, 2.0], batch_size=1).as_dict()
    assert set(d) == {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "cv",
                      "iterations", "throughput_per_s", "host_p50_ms", "host_p90_ms", "host_p99_ms",
                      "host_mean_ms", "round_medians_ms", "median_spread"}


def test_host_latency_is_reported_apart_and_sets_throughput():
    s = LatencyStats.from_samples([1.0, 1.0, 1.0, 1.0], batch_size=8, host_ms=[2.0, 2.0, 2.0, 6.0])
    assert (s.p50_ms, s.host_p50_ms, s.host_mean_ms) == (1.0, 2.0, 3.0)
    assert s.host_p99_ms == pytest.approx(5.88)
    assert s.throughput_per_s == pytest.approx(8 * 1000.0 / 3.0)  # what a caller waiting on each call gets


def test_median_spread_of_rounds():
    # Medians 1.0, 1.1, 0.9: quartiles 0.95 and 1.05 around the median 1.0.
    assert median_spread([[1.0, 1.0, 1.0], [1.1, 1.1], [0.9]]) == ([1.0, 1.1, 0.9], pytest.approx(0.1))
    assert median_spread([[5.0]]) == ([5.0], 0.0)


def test_one_hiccup_round_is_tolerated_lasting_load_is_not():
    """An H200's rounds of ResNet-50 fp16 batch 1 (CUDA graphs): four agree, one was hit by a hiccup."""
    seen = [0.4679, 0.4681, 0.5416, 0.4680, 0.4678]
    assert median_spread([[m] for m in seen])[1] < 0.001
    loaded = [0.4679, 0.4681, 0.5416, 0.5380, 0.4678]  # two rounds of five slowed
    assert median_spread([[m] for m in loaded])[1] > ValidateConfig().spread_warn_threshold


def test_jittery_calls_with_steady_medians_are_trusted():
    """Sub-millisecond GPU calls: a third of the calls jitter, the rounds' medians do not move."""
    rounds = [[0.46, 0.46, 0.47, 0.46, 0.9, 0.46, 1.4, 0.46, 0.47] for _ in range(5)]
    s = LatencyStats.from_samples([x for r in rounds for x in r], batch_size=1, rounds=rounds)
    assert s.cv > 0.4  # what the old rule flagged
    assert s.median_spread < ValidateConfig().spread_warn_threshold


def test_a_loaded_cpu_is_flagged():
    """Load that arrives mid-measurement (busy processes on every core) moves the rounds' medians apart."""
    busy: list[subprocess.Popen] = []

    def load(done_rounds: int) -> None:
        if done_rounds == 3:
            busy.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(3 * (os.cpu_count() or 1)))
            time.sleep(0.5)  # let the scheduler share the cores out

    try:
        # Calls of ~20 ms, as a model's on the CPU: longer than a scheduler slice, so load moves the
        # median (calls of 1 ms mostly finish inside one slice: load then shows in the tail only).
        stats = measure({"work": lambda: sum(range(600000))}, warmup=2, iterations=60, rounds=6,
                        min_seconds=0.0, batch_size=1, cuda=False, on_progress=load)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert stats["work"].median_spread > ValidateConfig().spread_warn_threshold


def test_measure_interleaves_candidates_in_rounds():
    calls: list[str] = []
    progress: list[int] = []
    stats = measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                    warmup=2, iterations=6, rounds=3, min_seconds=0.0, batch_size=1, cuda=False,
                    on_progress=progress.append)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up of each
    assert calls[4:] == ["a", "a", "b", "b"] * 3  # A, B, A, B, ... in 3 rounds of 2
    assert progress == [1, 2, 3]
    assert stats["a"].iterations == stats["b"].iterations == 6


def test_measure_times_each_call_in_milliseconds():
    """Each sample holds one call (its own clock's reading) and the samples fit in the time measure took.

    Both are orders between two readings of one clock, true at any load: no budget is assumed.
    """
    inside: list[float] = []

    def call():
        t0 = time.perf_counter()
        time.sleep(0.004)
        inside.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    s = measure({"sleep": call}, warmup=0, iterations=4, rounds=2, min_seconds=0.0, batch_size=1,
                cuda=False)["sleep"]
    outside_ms = (time.perf_counter() - t0) * 1000
    assert s.iterations == len(inside) == 4  # one sample per call, in 2 rounds of 2
    assert s.min_ms >= min(inside) >= 4.0  # milliseconds, each at least its call
    assert s.mean_ms * s.iterations <= outside_ms  # not blocks counted per call, nor microseconds


def test_measure_keeps_going_until_min_seconds():
    """Two instant calls (the asked-for rounds), then one that fills min_seconds alone: exactly three."""
    calls: list[int] = []

    def call():
        calls.append(1)
        if len(calls) > 2:
            time.sleep(0.3)  # sleeps at least this long, so it fills min_seconds whatever the load

    s = measure({"call": call}, warmup=0, iterations=2, rounds=2, min_seconds=0.3, batch_size=1,
                cuda=False)["call"]
    assert s.iterations == len(calls) == 3  # one more round than asked for, then it stopped
    assert s.mean_ms * s.iterations >= 300


def test_measure_runs_at_least_the_requested_iterations():
    stats = measure({"noop": lambda: None}, warmup=0, iterations=10, rounds=3, min_seconds=0.0,
                    batch_size=1, cuda=False)
    assert stats["noop"].iterations >= 10  # the docstring's promise; 9 are run


def test_thread_budget_asked_for_is_taken_as_it_is():
    assert thread_budget(3) == (3, "validate.threads=3")


def test_auto_thread_budget_stays_within_the_cores_this_process_may_use():
    import multiprocessing

    cpus = os.sched_getaffinity(0)
    threads, why = thread_budget(0)
    assert 1 <= threads <= physical_cores(cpus) <= len(cpus) and why.startswith("auto: ")
    # A process pinned to one CPU gets one thread, whatever the machine has.
    with multiprocessing.get_context("spawn").Pool(1, initializer=os.sched_setaffinity, initargs=(0, {min(cpus)})) as pool:
        assert pool.apply(thread_budget, (0,))[0] == 1
