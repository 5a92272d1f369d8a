"""The GPU lease (pipeline.gpu_lease) between real processes, and what a job records of it.

Holders are real `python` processes taking real flocks; each appends `acquire`, `waiting`
and `release` events to one log (O_APPEND: whole lines, in the order they happened) and
holds its GPU until the test creates its `go` file. Whether holders overlapped is read
from the order of those events, never from timings. No GPU is needed: the lease is about
slots, and where CUDA is absent the stage worker reports that it sees none.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console
from testkit import REPO, clean_env, cli_command, run_job, wait_for

from pipeline import compare, env, gpu_lease
from pipeline.errors import ConfigError
from pipeline.worker import StageWorker

HOLDER = r"""
import os, sys, time
from pathlib import Path
from pipeline import gpu_lease

name, log, go, slots = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(",")

def event(*words):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (" ".join((*words, name)) + "\n").encode())
    os.close(fd)

lease = gpu_lease.acquire(slots, say=lambda line: event("waiting"), poll=0.05)
event("acquire", lease.slot)
while not go.exists():
    time.sleep(0.02)
event("release", lease.slot)
lease.release()
"""


class Holders:
    def __init__(self, tmp: Path, slots: str):
        self.tmp, self.slots, self.log, self.procs = tmp, slots, tmp / "events.log", {}
        self.env = clean_env(PYTHONPATH=str(REPO), PIPELINE_STATE_DIR=str(tmp / "state"))

    def start(self, name: str) -> None:
        self.procs[name] = subprocess.Popen([sys.executable, "-c", HOLDER, name, str(self.log), str(self.tmp / f"go.{name}"),
                                             self.slots], cwd=REPO, env=self.env)

    def events(self) -> list[list[str]]:
        return [line.split() for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def held(self) -> dict[str, str]:
        """Holder -> slot, for every acquire not yet followed by its release."""
        now: dict[str, str] = {}
        for what, *rest in self.events():
            if what == "acquire":
                now[rest[-1]] = rest[0]
            elif what == "release":
                now.pop(rest[-1], None)
        return now

    def waiting(self) -> set[str]:
        acquired = {e[-1] for e in self.events() if e[0] == "acquire"}
        return {e[-1] for e in self.events() if e[0] == "waiting"} - acquired

    def most_at_once(self) -> int:
        count = most = 0
        for what, *_ in self.events():
            count += {"acquire": 1, "release": -1}.get(what, 0)
            most = max(most, count)
        return most

    def settle(self, holding: int, waiting: int) -> dict[str, str]:
        """Wait until `holding` hold and `waiting` said they wait; a broken lock never gets there."""
        return wait_for(lambda: len(self.held()) == holding and len(self.waiting()) == waiting and self.held(),
                        timeout=60, what=f"{holding} holding and {waiting} waiting; events: {self.events()}")

    def let_go(self, name: str) -> None:
        (self.tmp / f"go.{name}").touch()
        assert self.procs[name].wait(60) == 0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def holders(tmp_path):
    made: list[Holders] = []

    def make(slots: str) -> Holders:
        made.append(Holders(tmp_path, slots))
        return made[-1]

    yield make
    for h in made:
        h.stop()


def test_one_gpu_is_held_by_one_process_at_a_time(holders):
    h = holders("0")
    for name in ("a", "b", "c"):
        h.start(name)
    for remaining in (3, 2, 1):
        (holder,) = h.settle(holding=1, waiting=remaining - 1)
        h.let_go(holder)
    assert h.most_at_once() == 1
    kinds = [e[0] for e in h.events() if e[0] != "waiting"]
    assert kinds == ["acquire", "release"] * 3  # each release before the next acquire
    assert sorted(e[-1] for e in h.events() if e[0] == "acquire") == ["a", "b", "c"]


def test_two_gpus_are_held_by_at_most_two_processes_on_distinct_gpus(holders):
    h = holders("0,1")
    for name in ("a", "b", "c"):
        h.start(name)
    first = h.settle(holding=2, waiting=1)
    assert sorted(first.values()) == ["0", "1"]
    (third,) = h.waiting()
    gone = sorted(first)[0]
    h.let_go(gone)
    now = h.settle(holding=2, waiting=0)
    assert now[third] == first[gone]  # the freed GPU, not a third one
    for name in now:
        h.let_go(name)
    assert h.most_at_once() == 2


def test_a_holder_killed_outright_frees_its_gpu(holders):
    h = holders("0")
    h.start("a")
    h.settle(holding=1, waiting=0)
    h.start("b")
    h.settle(holding=1, waiting=1)
    h.procs["a"].send_signal(signal.SIGKILL)
    h.procs["a"].wait(60)
    wait_for(lambda: any(e[0] == "acquire" and e[-1] == "b" for e in h.events()), timeout=60,
             what=f"b to take the GPU a held; events: {h.events()}")
    assert not any(e[0] == "release" and e[-1] == "a" for e in h.events())  # a never let go: the kernel did
    h.let_go("b")


def test_visible_gpus_come_from_the_setting_then_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_lease.visible() == ["2", "3"]
    assert gpu_lease.visible([5]) == ["5"]  # gpus=[...] wins
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d")  # UUIDs, as MIG and some launchers give
    assert gpu_lease.visible() == ["GPU-1a2b", "GPU-3c4d"]
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert gpu_lease.visible() == []
    with pytest.raises(ConfigError, match="negative GPU index"):
        gpu_lease.visible([0, -1])


def test_lock_folders_are_per_host_and_per_slurm_job(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    plain = gpu_lease.lock_dir()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert plain.parent == tmp_path / "gpus" and gpu_lease.lock_dir() == plain.with_name(plain.name + ".slurm4242")


def test_the_stage_worker_runs_pinned_to_the_leased_gpu():
    """The env is set in the forked worker itself: the forkserver's environment is fixed when it starts."""
    worker = StageWorker()
    try:
        worker.gpu = "3"
        seen = worker.ask_gpu()
    finally:
        worker.close()
    assert seen["gpu.cuda_visible_devices"] == "3"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "3"  # the job's own environment is left alone
    if env.gpu_absent():
        assert seen["gpu.visible"] == "0" and "gpu.uuid" not in seen


def test_a_cpu_job_takes_no_lease(holders, tmp_path, monkeypatch):
    """gpus=[0] with GPU 0 held elsewhere: a CPU job runs on, never waiting (a timer ends the hold if it did)."""
    h = holders("0")
    monkeypatch.setenv("PIPELINE_STATE_DIR", h.env["PIPELINE_STATE_DIR"])
    h.start("a")
    h.settle(holding=1, waiting=0)
    timer = threading.Timer(300, (tmp_path / "go.a").touch)
    timer.start()
    try:
        job = run_job(tmp_path / "out", "target=onnxruntime", "gpus=[0]", "tracking.enabled=false")
    finally:
        timer.cancel()
    assert job.result.status == "FINISHED", job.log[-2000:]
    assert h.held() == {"a": "0"}  # still held: the job never needed it
    assert not any(k.startswith("gpu.") for k in job.result.tags) and "waiting for a free GPU" not in job.log
    h.let_go("a")


def test_a_cuda_job_waits_for_its_gpu_then_records_it(holders, tmp_path):
    """target=tensorrt runs on CUDA (TensorRT-RTX builds here without a GPU): it waits while GPU 0 is held."""
    h = holders("0")
    h.start("a")
    h.settle(holding=1, waiting=0)
    out = tmp_path / "job"
    job = subprocess.Popen([*cli_command(out, "target=tensorrt", "gpus=[0]", "tracking.enabled=false")], cwd=REPO,
                           env=h.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True).start()
    try:
        wait_for(lambda: any("waiting for a free GPU (1 busy: 0)" in line for line in lines), timeout=300,
                 what="the job to wait for GPU 0")
        assert job.poll() is None
        h.let_go("a")
        assert job.wait(600) == 0, "".join(lines)[-3000:]
    finally:
        job.kill()
    import json

    tags = json.loads((out / "run" / "run.json").read_text())["tags"]
    assert tags["gpu.index"] == "0" and tags["gpu.cuda_visible_devices"] == "0"
    assert float(tags["gpu.lease.end"]) >= float(tags["gpu.lease.start"])
    assert h.held() == {}  # the job let go of it as it ended
    assert "gpu: 0 " in "".join(lines)


def record(job: int, gpu: dict[str, str] | None) -> dict:
    tags = {f"gpu.{k}": v for k, v in (gpu or {}).items()}
    return {"job": job, "overrides": f"model.seed={job}", "target": "inductor", "status": "FINISHED",
            "metrics": {"latency_p50_ms": 1.0 + job, "rel_l2_err": 1e-4, "validated": 1.0}, "tags": tags}


def headers(jobs) -> list[str]:
    return [str(c.header) for c in compare.table(jobs, "sweep").columns]


def markdown_header(jobs) -> list[str]:
    lines = compare.markdown(jobs, "sweep").splitlines()
    return lines[lines.index("```text") + 1].split()


def rendered(jobs) -> str:
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(compare.table(jobs, "sweep"))
    return console.export_text()


def test_the_comparison_shows_the_gpu_and_flags_mixed_cards():
    h200 = {"index": "0", "name": "NVIDIA H200", "uuid": "GPU-0123456789abcdef"}
    same = [record(0, h200), record(1, {**h200, "index": "1"})]
    assert [r["gpu"] for r in compare.rows(same)] == ["0 NVIDIA H200 GPU-01234567", "1 NVIDIA H200 GPU-01234567"]
    assert "gpu" in headers(same) and "gpu" in markdown_header(same) and "not comparable" not in rendered(same)
    cpu = [record(0, None), record(1, None)]
    assert "gpu" not in headers(cpu) and "gpu" not in markdown_header(cpu)  # no column where no job leased one
    assert "gpu" in headers([record(0, None), record(1, h200)])
    mixed = [*same, record(2, {"index": "2", "name": "NVIDIA A100-SXM4-80GB"})]
    text = rendered(mixed)
    assert "jobs timed on different GPUs (NVIDIA A100-SXM4-80GB, NVIDIA H200)" in text
    assert "latencies are not comparable" in compare.markdown(mixed, "g")
