"""User-facing errors.

Two kinds of failure reach the user: a mistake in what they asked for (or a target that
cannot run here) and a configuration that fails to compile. Both are a PipelineError:
one line naming the problem and the fix, a non-zero exit, no traceback unless asked
for. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class PipelineError(Exception):
    """A problem the user can fix; `fix` says how."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __reduce__(self):
        """Pickled with its fix: errors raised in the stage worker reach the job whole."""
        return (type(self), (self.problem, self.fix))

    def one_line(self) -> str:
        text = " ".join(self.problem.split())
        return f"{text} Fix: {' '.join(self.fix.split())}" if self.fix else text


class ConfigError(PipelineError):
    """The configuration asks for something that cannot exist (unknown op, bad shape...)."""


class TargetUnavailable(PipelineError):
    """The chosen target cannot run on this machine."""


class CompileError(PipelineError):
    """A valid configuration that the target failed to compile or that failed validation."""

    exit_code = 3


class ArtifactError(PipelineError):
    """An artifact on disk is missing, unreadable or corrupt."""


class StageCrashed(CompileError):
    """A stage's process died in native code (a signal, an abort on a full disk): the job records it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, docker stop, Kubernetes, SLURM's scancel) handled as an interrupt: the run ends KILLED."""

    signal_name = "SIGTERM"


@contextlib.contextmanager
def terminate_as_interrupt():
    """While a job runs, SIGTERM raises Terminated in the main thread, so it is recorded, not lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def first_line(err: BaseException) -> str:
    """An exception's first message line (its type's name when the message is empty), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
