"""Memory a job needs, estimated before any stage; a job that cannot fit is refused in one line.

The estimate: the weights (the fp32 reference, the copies export and the engines hold,
the eager model at the job's precision), the input batches validate makes, and the
activations, measured at batch 1 (the live bytes of every tensor an op returns, at
their peak; traced on the meta device where the model runs there, else on the CPU)
and scaled to the largest batch the job runs. Validate runs the fp32 reference on the
host, so host memory always holds fp32 activations; on a GPU the compiled module and
eager each take theirs at the job's precision (a CUDA graph's pool keeps its peak). It
is an estimate: it catches the job that needs ten times what the machine has (ResNet-50
at batch 20000) before it spends minutes building, not one that misses by a few percent.

Measured after the fact, per stage: the worker records each stage's peak RSS and GPU
memory (pipeline.worker).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

GB = 2**30


def activation_peak_bytes(model, sample) -> int:
    """Peak bytes of the tensors the forward's ops return and keep alive, at once (storages counted once)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors holding it]
    state = {"now": 0, "peak": 0}

    def release(ptr: int) -> None:
        entry = live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                state["now"] -= entry[0]
                del live[ptr]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    ptr = t.untyped_storage()._cdata  # the storage itself: meta storages have no data pointer
                    if ptr not in live:
                        live[ptr] = [t.untyped_storage().nbytes(), 0]
                        state["now"] += live[ptr][0]
                        state["peak"] = max(state["peak"], state["now"])
                    live[ptr][1] += 1
                    weakref.finalize(t, release, ptr)
            return out

    with torch.no_grad(), Track():
        sample(model)
    return state["peak"]


def at_batch_one(input_cfg, dims: dict[str, int]):
    """One seeded sample at `dims` with every input's leading size 1 (never made at full size first)."""
    from omegaconf import OmegaConf

    from pipeline import shapes

    spec = OmegaConf.to_container(input_cfg, resolve=True)
    dims = dict(dims)
    for tensor in spec["tensors"]:
        if tensor["shape"] and isinstance(tensor["shape"][0], str):
            dims[tensor["shape"][0]] = 1
        elif tensor["shape"]:
            tensor["shape"][0] = 1
    return shapes.make(OmegaConf.create(spec), dims, 1)[0]


def estimate(config: dict[str, Any], device: str) -> dict[str, Any]:
    """Bytes the job needs on the host and on `device`, with the parts they are made of."""
    from omegaconf import OmegaConf

    from pipeline import shapes
    from pipeline.dtypes import model_dtype

    input_cfg = OmegaConf.create(config["input"])
    dims = shapes.corners(input_cfg)["max"]
    batch = shapes.batch_size(input_cfg, dims)
    one = at_batch_one(input_cfg, dims)
    per_sample_input = sum(t.numel() * t.element_size() for t in [*one.args, *one.kwargs.values()])
    weights, per_sample_act = weigh(config["model"], one)
    scale = {"float16": 0.5, "bfloat16": 0.5}.get(model_dtype(config["compile"]["precision"]), 1.0)
    samples = int(config["validate"]["num_samples"])
    host = {"weights": 3 * weights, "inputs": (samples + 1) * per_sample_input * batch,
            "activations": per_sample_act * batch}  # the fp32 reference runs on the host
    out = {"batch": batch, "host": host, "device": None}
    if device == "cuda":
        out["device"] = {"weights": 2 * weights * scale, "inputs": 2 * per_sample_input * batch * scale,
                         "activations": 2 * per_sample_act * batch * scale}
    else:  # eager and the engines run on the host too, at the job's precision
        host["activations"] += 2 * per_sample_act * batch * scale
    return out


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def weigh(model_cfg: dict[str, Any], one) -> tuple[int, int]:
    """(weight bytes, activation peak bytes at batch 1) of the job's model.

    The model is built as export builds it, then its activations are traced on the meta device:
    sizes only, no arithmetic (ResNet-50 here: 0.3 s against 2.2 s for the forward on the CPU,
    loaded machine). It is moved there after it is built, not built there, so no module the
    factory imports can keep a meta tensor. A model that cannot run on meta (its Python branches
    on values, an op without a meta kernel) is built again and measured on the CPU.
    """
    from omegaconf import OmegaConf

    from pipeline.models import build_model

    cfg = OmegaConf.create(model_cfg)
    model = build_model(cfg)
    weights = model_bytes(model)
    traced = activations_on_meta(model, one)
    return weights, traced if traced is not None else activation_peak_bytes(build_model(cfg), one)


def activations_on_meta(model, one) -> int | None:
    """activation_peak_bytes on the meta device (the model is moved there), or None where it cannot run."""
    try:
        return activation_peak_bytes(model.to("meta"), one.to("meta"))
    except Exception:  # noqa: BLE001 - any failure on meta means: measure it for real
        return None


def host_available() -> tuple[float, str]:
    """Bytes the host can still give this job: the cgroup's headroom where it is limited, else MemAvailable."""
    cgroup = Path("/sys/fs/cgroup")
    limit = (cgroup / "memory.max").read_text().strip() if (cgroup / "memory.max").is_file() else "max"
    if limit != "max" and (cgroup / "memory.current").is_file():
        return int(limit) - int((cgroup / "memory.current").read_text()), "the cgroup's memory.max less memory.current"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "MemAvailable"
    return float("inf"), "unknown"


def describe(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / GB:.1f}" for k, v in parts.items())


def check(config: dict[str, Any], device: str) -> dict[str, Any]:
    """Refuse, in one line, a job whose estimate exceeds the memory free on the host or the device.

    A model that fails at batch 1 is not estimated: export then says what is wrong with it.
    """
    try:
        needed = estimate(config, device)
    except Exception:  # the model's own errors, reported by export in its words
        return {}
    free, source = host_available()
    wants = {"host": (sum(needed["host"].values()), free, source, needed["host"])}
    import torch

    if needed["device"] is not None and torch.cuda.is_available():  # a build-only machine runs nothing here
        gpu_free, gpu_total = torch.cuda.mem_get_info()
        wants["GPU"] = (sum(needed["device"].values()), gpu_free,
                        f"free of {gpu_total / GB:.1f} GB on {torch.cuda.get_device_name()}", needed["device"])
    for where, (need, have, source, parts) in wants.items():
        if need > have:
            raise ConfigError(
                f"the job needs about {need / GB:.1f} GB of {where} memory at batch {needed['batch']} "
                f"({describe(parts)} GB) but {have / GB:.1f} GB is available ({source}).",
                "lower the batch (input.tensors shapes or input.dims.<dim>.max) or validate.num_samples; "
                "check_memory=false skips this estimate.")
    return {"memory.host_needed_gb": round(wants["host"][0] / GB, 3),
            **({"memory.gpu_needed_gb": round(wants["GPU"][0] / GB, 3)} if "GPU" in wants else {})}
