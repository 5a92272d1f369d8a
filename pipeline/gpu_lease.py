"""One GPU of this node per CUDA job: a lease taken before the job's first GPU stage, held to its end.

Hydra's joblib launcher starts a sweep's jobs side by side and nothing gave them separate
devices: every job ran on GPU 0, and jobs timing or autotuning engines on one card spoil
one another's figures. A job whose engines run on CUDA takes one slot of the node's
visible GPUs (an exclusive flock on one file per GPU) and its stage worker runs with
CUDA_VISIBLE_DEVICES naming that GPU alone. With one GPU a sweep's GPU jobs run one after
another while its CPU jobs go on in parallel; with eight, eight run at once, one a card.
The kernel drops a flock when its process dies, so a job killed outright never keeps a GPU.

The locks live in the per-user state folder (pipeline.provenance), one folder per host (a
home shared over NFS serves many nodes, and GPU 0 of one is not GPU 0 of another) and per
SLURM job (SLURM numbers each job's own GPUs from 0, so two jobs' "0" are two cards). Jobs
of other users are not seen: give each user their GPUs (CUDA_VISIBLE_DEVICES or `gpus=`).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import env, provenance

POLL_SECONDS = 0.25


def visible(setting: list[int] | None = None) -> list[str]:
    """The GPUs this node's jobs may share, as CUDA_VISIBLE_DEVICES entries (indices, or UUIDs where given so).

    `gpus=[...]` first, then CUDA_VISIBLE_DEVICES as the launcher set it (SLURM and Ray set it
    per job), then every GPU `nvidia-smi -L` lists. Asked only for CUDA jobs: CPU jobs pay nothing.
    """
    if setting is not None:
        if any(int(i) < 0 for i in setting):
            from pipeline.errors import ConfigError

            raise ConfigError(f"gpus={list(setting)} names a negative GPU index.",
                              "list CUDA indices from 0 (nvidia-smi -L shows them), e.g. gpus=[0,1], or leave gpus unset.")
        return [str(int(i)) for i in setting]
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        entries = [e.strip() for e in given.split(",") if e.strip()]
        return [] if entries[:1] in ([], ["-1"]) else entries
    if env.gpu_absent():
        return []
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            return [str(i) for i in range(sum(line.startswith("GPU ") for line in listing.splitlines()))]
        except (OSError, subprocess.SubprocessError):
            pass
    import torch  # a container without nvidia-smi: torch is loaded already for a CUDA job

    return [str(i) for i in range(torch.cuda.device_count())]


def lock_dir() -> Path:
    scope = socket.gethostname() + (f".slurm{os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else "")
    return provenance.state_dir() / "gpus" / scope


class Lease:
    """One GPU held by this process: `slot` is its CUDA_VISIBLE_DEVICES entry."""

    def __init__(self, slot: str, fd: int, waited: float):
        self.slot, self.fd = slot, fd
        # When it was held (epoch seconds, this host's clock): whether a sweep's jobs shared a GPU reads from them.
        self.tags: dict[str, str] = {"gpu.index": slot, "gpu.lease.start": f"{time.time():.3f}",
                                     "gpu.lease.waited_s": f"{waited:.1f}"}

    def release(self) -> dict[str, str]:
        """Free the GPU; the tag that says when."""
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # also for any child that inherited the descriptor
            os.close(self.fd)
            self.fd = -1
            self.tags["gpu.lease.end"] = f"{time.time():.3f}"
        return self.tags


def _try(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)  # who holds it, for a person looking at the folder
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def acquire(slots: list[str], folder: Path | None = None, say: Callable[[str], None] = print,
            poll: float = POLL_SECONDS) -> Lease:
    """The first free slot, waiting (one line said) while every one is held."""
    folder = folder or lock_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    waiting, started = False, time.monotonic()
    while True:
        for slot in slots:
            fd = _try(folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', slot)}.lock")
            if fd is not None:
                return Lease(slot, fd, time.monotonic() - started)
        if not waiting:
            say(f"waiting for a free GPU ({len(slots)} busy: {','.join(slots)})")
            waiting = True
        time.sleep(poll)


def pin(slot: str) -> None:
    """In the stage worker, before CUDA starts there: the leased GPU is the only one it sees."""
    os.environ["CUDA_VISIBLE_DEVICES"] = slot


def seen() -> dict[str, Any]:
    """What the stage worker sees once pinned: how many GPUs (1), and that card's UUID and model."""
    import torch

    count = torch.cuda.device_count()
    out: dict[str, Any] = {"gpu.visible": str(count), "gpu.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    if count:
        props = torch.cuda.get_device_properties(0)
        uuid = str(getattr(props, "uuid", "") or "")
        out.update({"gpu.name": props.name, **({"gpu.uuid": f"GPU-{uuid}"} if uuid else {})})
    return out


def take(config: dict[str, Any], device: str, worker, say: Callable[[str], None]) -> Lease | None:
    """A CUDA job's GPU, pinned in its stage worker; None for CPU jobs and where no GPU is visible."""
    if device != "cuda":
        return None
    slots = visible(config.get("gpus"))
    if not slots:
        return None
    lease = acquire(slots, say=say)
    try:
        worker.gpu = lease.slot
        lease.tags.update(worker.ask_gpu())
    except BaseException:  # the runner never got the lease: free it here (a joblib worker lives on)
        lease.release()
        raise
    if "gpu.name" in lease.tags:  # the card this job ran on, which may not be the node's GPU 0
        lease.tags["device.name"] = lease.tags["gpu.name"]
    say(f"gpu: {lease.slot} of {','.join(slots)} ({lease.tags.get('gpu.name', 'no CUDA device seen')}"
        f"{', ' + lease.tags['gpu.uuid'] if 'gpu.uuid' in lease.tags else ''})")
    return lease


# --- in the comparison of a sweep (pipeline.compare) ----------------------------------------

def label(job: dict[str, Any]) -> str:
    """`3 NVIDIA H200 GPU-1a2b3c4d`: the GPU a job leased (index, model, UUID's start), else '-'."""
    tags = job.get("tags") or {}
    if "gpu.index" not in tags:
        return "-"
    return " ".join(v for v in (tags["gpu.index"], tags.get("gpu.name"), tags.get("gpu.uuid", "")[:12]) if v)


def shown(columns, jobs: list[dict[str, Any]]) -> list[str]:
    """The table's columns, its `gpu` column only where some job leased a GPU."""
    return [c for c in columns if c != "gpu" or any(label(j) != "-" for j in jobs)]


def mixed(jobs: list[dict[str, Any]]) -> list[str]:
    """A warning line when a sweep's jobs ran on different card models: their timings do not compare."""
    names = sorted({(j.get("tags") or {}).get("gpu.name") for j in jobs} - {None})
    if len(names) < 2:
        return []
    return [f"warning: jobs timed on different GPUs ({', '.join(names)}): their latencies are not comparable; "
            "run the sweep on one card model (gpus=[...] or CUDA_VISIBLE_DEVICES)"]
