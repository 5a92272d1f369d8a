"""A stage killed by the kernel for memory is reported as out of memory, not as a native crash.

A real memory cgroup with a small limit holds the job (created under this process's own
cgroup, as root), and the model's factory touches more than that: the kernel kills the
stage worker, and the job must say that memory ran out, in one line, before any build.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from testkit import REPO, clean_env, cli_command

LIMIT = 3 * 2**30  # the job, its forkserver and the stage worker fit; the factory's 6 GiB does not


def memory_cgroup() -> Path | None:
    """A new child of this process's memory cgroup (v2 or v1), or None where it cannot be made."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            parent = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_file = "memory.max"
        elif "memory" in controllers.split(","):
            parent = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file = "memory.limit_in_bytes"
        else:
            continue
        child = parent / f"pipeline-oom-{uuid.uuid4().hex[:8]}"
        try:
            child.mkdir()
            (child / limit_file).write_text(str(LIMIT))
            return child
        except OSError:
            if child.is_dir():
                child.rmdir()
    return None


def test_a_stage_killed_for_memory_is_reported_out_of_memory(tmp_path):
    cgroup = memory_cgroup()
    if cgroup is None:
        pytest.skip("no memory cgroup can be created here (needs root and a writable cgroup file system)")
    try:
        command = cli_command(tmp_path, "model._target_=testkit.memory_hog", "+model.kwargs.gib=6",
                              "tracking.enabled=false", cache=tmp_path / "cache")
        # The job enters the cgroup before it starts: its forkserver and stage worker are born in it.
        shell = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
        proc = subprocess.run(["sh", "-c", shell, "sh", *command], cwd=REPO, capture_output=True, text=True,
                              env=clean_env(PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1"), timeout=600)
    finally:
        if not (cgroup / "cgroup.procs").read_text().strip():  # every process of the job has ended
            os.rmdir(cgroup)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("error:")]
    # The memory check builds the model first (to weigh it), so the factory's allocation ends there.
    assert "stage memory check ran out of host memory" in line and "Traceback" not in out
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "export").exists()  # killed before any build
    assert "native code" not in line
