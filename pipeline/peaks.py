"""Memory peaks per stage, and memory failures told as such rather than as crashes.

The stage worker serves every stage of a job, so its lifetime peak says nothing about
one stage: before each, the kernel's record of the peak RSS is cleared (writing 5 to
/proc/self/clear_refs resets VmHWM) and torch's CUDA peak is reset. A process the
kernel's OOM killer ends dies by SIGKILL like any other; the kernel's oom_kill counter
(the cgroup's memory.events, else /proc/vmstat) rising while the stage ran tells them
apart. A CUDA out-of-memory error becomes one line naming the batch and what was free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import CompileError

MB = 2**20


def reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak is then the process's so far
        pass
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def host_peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def read(stage: str) -> dict[str, float]:
    """`<stage>.host_peak_rss_mb` and, where the stage used CUDA, `<stage>.gpu_mem_peak_mb` (torch's allocator)."""
    import torch

    out = {}
    rss = host_peak_rss_mb()
    if rss is not None:
        out[f"{stage}.host_peak_rss_mb"] = round(rss, 1)
    if torch.cuda.is_initialized():
        out[f"{stage}.gpu_mem_peak_mb"] = round(torch.cuda.max_memory_allocated() / MB, 1)
    return out


def oom_kills() -> int | None:
    """The kernel's count of processes its OOM killer ended: this cgroup's, else the whole machine's."""
    for path, key in ((Path("/sys/fs/cgroup/memory.events"), "oom_kill"), (Path("/proc/vmstat"), "oom_kill")):
        try:
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except OSError:
            continue
    return None


def out_of_gpu_memory(err: BaseException, stage: str, config: dict[str, Any]) -> CompileError | None:
    """A CUDA out-of-memory error as one line naming the batch and the free memory; None for other errors."""
    import torch

    if not isinstance(err, torch.OutOfMemoryError):
        return None
    from omegaconf import OmegaConf

    from pipeline import shapes

    batch = "?"
    if "input" in config:
        input_cfg = OmegaConf.create(config["input"])
        batch = str(shapes.batch_size(input_cfg, shapes.corners(input_cfg)["max"]))
    free, total = torch.cuda.mem_get_info()
    return CompileError(
        f"stage {stage} ran out of GPU memory at batch {batch}: {free / MB:.0f} MB free of {total / MB:.0f} MB "
        f"on {torch.cuda.get_device_name()} ({str(err).splitlines()[0][:160]}).",
        "lower the batch (input.tensors shapes or input.dims.<dim>.max), or free the GPU.")
