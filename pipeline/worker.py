"""The stage worker: one child process per job runs its stages, so a crash kills only the child.

Compilers and loaders are native code: a segfault in ONNX Runtime, TensorRT or an
AOTInductor package, or an abort when the disk fills up, would otherwise take the whole
job (or a whole sweep) down with nothing recorded. As Model Navigator does, the work
runs in a child process; unlike it, one child serves every stage of a job, because a
fresh interpreter importing torch costs ~2 s here and the orchestrator must stay cheap.

Children are forked from a forkserver that imported torch and the stages once, so a job
pays milliseconds for its worker, not an import. Each request names the stage, the
config it may read, the target (name and settings) and its folders; the reply is the
stage's metrics, notes and printed text, or its error. When the child dies instead,
the job gets a StageCrashed naming the stage and the signal.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import env, logs, peaks
from pipeline.errors import PipelineError, StageCrashed

# Imported once by the forkserver, so each job's worker starts with them loaded (the stage modules
# import torch and pipeline.hybrid only inside their functions: named here so the server has them).
PRELOAD = ["torch", "pipeline.worker", "stages", "pipeline.hybrid"]
# And for the jobs of a sweep: torch.export's loader (torch._dynamo, sympy: ~2 s of CPU), which
# every job imports (in export, or in the first stage that loads a program when export is a
# cache hit), so each job of a sweep paid it again. A single run imports it in its stage.
SWEEP_PRELOAD = ("torch.export.pt2_archive._package", "torch._export.serde.serialize")
POLL_SECONDS = 0.2
# Below this much free space a crashed stage is blamed on the disk.
LOW_DISK = 64 * 2**20
# The request that estimates the job's memory before any stage (pipeline.memory), not a stage.
MEMORY_CHECK = "memory check"
# The request that reports the GPU the worker sees once pinned (pipeline.gpu_lease), not a stage.
GPU_CHECK = "gpu check"


@dataclass
class Request:
    stage: str
    config: dict[str, Any]
    target: str
    settings: dict[str, Any]
    inputs: dict[str, str]
    out: str
    job_pid: int
    # What the runner resolved once for the job (Runner.resolve): device, quantization route, ...
    resolved: dict[str, Any] = field(default_factory=dict)
    # The job's leased GPU (a CUDA_VISIBLE_DEVICES entry), set before CUDA starts in the worker; None: no lease.
    gpu: str | None = None


@dataclass
class Reply:
    metrics: dict[str, Any] | None = None
    notes: list[str] | None = None
    text: str = ""
    error: BaseException | None = None
    trace: str | None = None


def _context(extra: tuple[str, ...] = ()):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, *extra])  # read once, when the server starts
    return ctx


def serve(conn, job_pid: int) -> None:
    """The child's loop: run each requested stage, reply, until the job closes the pipe or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job decides what an interrupt means
    threading.Thread(target=_exit_with_job, args=(job_pid,), daemon=True).start()
    while True:
        try:
            request: Request = conn.recv()
        except EOFError:
            return
        conn.send(run_request(request))


def _exit_with_job(job_pid: int) -> None:
    """A worker whose job was killed outright (SIGKILL) must not run on alone: its parent is the forkserver."""
    while True:
        time.sleep(1.0)
        if not env.pid_alive(job_pid):
            os._exit(1)


def run_request(request: Request) -> Reply:
    import io

    from omegaconf import OmegaConf
    from rich.console import Console

    import stages
    from pipeline import targets
    from pipeline.stage import StageContext

    os.environ["PIPELINE_JOB_PID"] = str(request.job_pid)
    if request.gpu is not None:
        from pipeline import gpu_lease

        gpu_lease.pin(request.gpu)
        if request.stage == GPU_CHECK:
            return Reply(metrics=gpu_lease.seen(), notes=[])
    console = Console(file=io.StringIO(), record=True, width=120, soft_wrap=True, highlight=False)
    try:
        target = targets.target_class(request.target)(request.settings)
        if request.stage == MEMORY_CHECK:  # before any stage, in this process that has torch loaded
            from pipeline import memory

            return Reply(metrics=memory.check(request.config, target.device()), notes=[])
        ctx = StageContext(config=OmegaConf.create(request.config, flags={"readonly": True}), target=target,
                           inputs={k: Path(v) for k, v in request.inputs.items()}, out=Path(request.out),
                           console=console, resolved=request.resolved)
        peaks.reset()
        with logs.collapse_repeats():
            metrics = stages.BY_NAME[request.stage].run(ctx)
        return Reply(metrics={**metrics, **peaks.read(request.stage)}, notes=ctx.notes, text=console.export_text())
    except BaseException as err:  # every error goes back to the job, which decides what it means
        err = peaks.out_of_gpu_memory(err, request.stage, request.config) or err
        return Reply(error=_portable(err), trace=traceback.format_exc(), text=console.export_text())


def _portable(err: BaseException) -> BaseException:
    """The error if it survives pickling, else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


@contextlib.contextmanager
def _standard_start_method():
    """Inside joblib's loky workers the global start method is 'loky', which a forkserver child
    cannot set up again: start ours under a standard method, then put theirs back."""
    previous = multiprocessing.get_start_method(allow_none=True)
    if previous in (None, "fork", "spawn", "forkserver"):
        yield
        return
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(previous, force=True)


def warm_up(extra: tuple[str, ...] = ()) -> None:
    """Start the forkserver (and its imports: PRELOAD and `extra`) now, while the job still checks.

    The server lives as long as the job's process: the jobs of a sweep that Hydra runs in one
    process (the basic launcher, each joblib worker) fork their workers from the first job's server.
    """
    from multiprocessing import forkserver

    _context(extra)
    forkserver.ensure_running()


# Whether a job of this process forked a worker from the forkserver (warm_up, the one place it is
# started, leaves its pid in multiprocessing's state).
_SERVER = {"used": False}


def start_early(args: list[str]) -> None:
    """`python -m pipeline key=value ...`: start the forkserver (python and torch's import, seconds
    of CPU) at the process's first moment, so it overlaps Hydra composing and checking the job.

    Only for a plain single run: a flag (-m, --cfg, --help, ...) or a hydra.mode override leaves
    it to the job (run_job's warm_up, with a sweep's preloads). stop_unused ends it if no job used it.
    """
    if any(a.startswith("-") or a.lstrip("+~").startswith("hydra.mode") for a in args):
        return
    warm_up()


def stop_unused() -> None:
    """End a forkserver this process started and no job forked from (the request was refused before
    any job ran): it would otherwise go on importing torch for seconds after the process has exited."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if _SERVER["used"] or pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class StageWorker:
    """The job's side: start the child early (its start overlaps the job's checks), send stages, watch it."""

    def __init__(self):
        ctx = _context()
        _SERVER["used"] = True
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, os.getpid()), daemon=True,
                                   name="pipeline-stage-worker")
        with _standard_start_method():
            self.process.start()
        child.close()
        self.gpu: str | None = None  # the job's leased GPU, pinned in the child with every request

    def ask_gpu(self) -> dict[str, str]:
        """Pin the leased GPU in the child now and read what it sees there (count, UUID, model)."""
        request = Request(stage=GPU_CHECK, config={}, target="", settings={}, inputs={}, out="", job_pid=os.getpid())
        reply = self.run(request)
        if reply.error is not None:
            reraise(reply, request)
        return reply.metrics

    def run(self, request: Request) -> Reply:
        oom_before = peaks.oom_kills()  # the kernel's count now: a rise while this stage ran means it was killed for memory
        request.gpu = self.gpu
        try:
            self.conn.send(request)
            while not self.conn.poll(POLL_SECONDS):
                if not self.process.is_alive():
                    raise EOFError
            reply: Reply = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise crashed(request, self.process.exitcode, oom_before) from None
        except BaseException:  # interrupted (SIGINT, SIGTERM): stop the stage before its staging is removed
            self.kill()
            raise
        return reply

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.process.join(2)
            self.kill()


def crashed(request: Request, exitcode: int | None, oom_kills_before: int | None = None) -> StageCrashed:
    """One line naming the stage and how its process ended (the disk when it is full, memory when the
    kernel's OOM killer ended it)."""
    if exitcode is not None and exitcode < 0:
        how = f"was killed by {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with status {exitcode}"
    now = peaks.oom_kills()
    if exitcode == -signal.SIGKILL and oom_kills_before is not None and now is not None and now > oom_kills_before:
        return StageCrashed(
            f"stage {request.stage} ran out of host memory: the kernel's OOM killer ended its process "
            f"(oom_kill count {oom_kills_before} -> {now}).",
            "lower the batch (input.tensors shapes or input.dims.<dim>.max) or validate.num_samples, "
            "or run where more memory is free.")
    if shutil.disk_usage(Path(request.out).parent).free < LOW_DISK:  # native writers abort on a full disk
        return disk_full(request.stage, Path(request.out), how)
    return StageCrashed(
        f"stage {request.stage} crashed: its process {how} (native code in {request.target} or torch failed).",
        "rerun with target=eager or another target to confirm, keep the failing ops in PyTorch with "
        "compile.torch_executed_ops, or report the crash with the run folder.")


def disk_full(stage: str, path: Path, how: str = "ran out of disk space") -> StageCrashed:
    """One line naming where the disk filled up, how much is left and what the stage had written."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    written = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    so_far = f"; it had written {written / 2**20:.1f} MB" if written else ""
    return StageCrashed(
        f"stage {stage} {how}: the disk holding {folder} is full ({free / 2**20:.1f} MB free{so_far}).",
        "free space there (python -m pipeline.cache prune --max-size ...), or point paths.cache / "
        "paths.outputs at a larger disk.")


def reraise(reply: Reply, request: Request) -> None:
    """Raise the stage's error in the job: user errors as they are, bugs with the child's traceback.

    Writers that hit a full disk fail in many ways (OSError ENOSPC, torch's "file write
    failed" RuntimeError): with the disk nearly full, any failure is reported as that.
    """
    err = reply.error
    if isinstance(err, (PipelineError, KeyboardInterrupt)):
        raise err
    out = Path(request.out)
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or shutil.disk_usage(out.parent).free < LOW_DISK:
        raise disk_full(request.stage, out) from None
    raise RuntimeError(f"stage {request.stage} failed in the stage worker:\n{reply.trace}")
