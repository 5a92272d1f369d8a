"""The environment that changes an artifact: library versions, device, compute capability.

Each cache key holds the device and the versions of the libraries its stage and target
use (pipeline.cache.environment), so an engine built for one GPU or library version is
never reused for another; the MLflow tags carry all of them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform

LIBRARIES = ("torch", "torchvision", "transformers", "onnx", "onnxscript", "onnxruntime", "tensorrt",
             "tensorrt_rtx", "torch_tensorrt", "triton", "torchao", "nvidia-modelopt")


def library_version(dist: str) -> str | None:
    for name in (dist, dist.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.cache
def libraries() -> dict[str, str]:
    return {name: v for name in LIBRARIES if (v := library_version(name))}


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine runs under `pid` (someone else's counts as alive)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Device nodes of every GPU torch.cuda can use on Linux: NVIDIA's driver, ROCm's, WSL's.
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


@functools.cache
def gpu_absent() -> bool:
    """True where no GPU can be there: Linux without a GPU device node.

    torch.cuda.is_available() would say the same after importing torch, which costs the
    job's process seconds of CPU (the stage worker imports it anyway, in parallel): on a
    CPU-only machine the orchestrator answers "no GPU" without it. Elsewhere, ask torch.
    """
    import os
    import sys

    return sys.platform.startswith("linux") and not any(os.path.exists(node) for node in GPU_NODES)


@functools.cache
def device_info() -> dict[str, str]:
    """The accelerator if torch sees one, else the CPU."""
    if gpu_absent():
        return {"device": _cpu_name(), "compute_capability": "none", "kind": "cpu"}
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {"device": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
                "kind": "cuda"}
    return {"device": _cpu_name(), "compute_capability": "none", "kind": "cpu"}


def device_tags(kind: str) -> dict[str, str]:
    """Where the engines run ('cuda' or 'cpu') and that device's model (the GPU's name, or the CPU's)."""
    info = device_info()
    return {"device": kind, "device.name": info["device"] if kind == "cuda" and info["kind"] == "cuda"
            else _cpu_name()}
