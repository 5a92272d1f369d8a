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


# Signals that arrived before the job could record them (held), and whether they raise now.
_SIGNALS: dict[str, object] = {"armed": False, "pending": None}


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame):
    if not _SIGNALS["armed"]:
        _SIGNALS["pending"] = signum  # raised by arm_signals() once the job's record exists
        return
    raise _interrupt(signum)


def hold_signals() -> None:
    """At the process's first moment: SIGTERM and SIGINT are held while Hydra composes, then raised.

    Without this, SIGTERM in the first seconds (imports, composing) ends the process with
    no record at all, and SIGINT prints a traceback from whatever was importing.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def arm_signals() -> None:
    """The job's record exists: signals raise from now on, and one held meanwhile raises now."""
    _SIGNALS["armed"] = True
    pending, _SIGNALS["pending"] = _SIGNALS["pending"], None
    if pending is not None:
        raise _interrupt(pending)


def held_signal() -> int | None:
    """A signal held and never raised (the process ended before a job could record it)."""
    return _SIGNALS["pending"]


@contextlib.contextmanager
def signals_blocked():
    """Signals wait while a KILLED record is written (a second SIGTERM must not cut it short)."""
    blocked = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        except KeyboardInterrupt:  # the one that waited: the job is ending for a signal anyway
            pass


_DEFERRED: dict[str, int | None] = {"signal": None, "active": False}


@contextlib.contextmanager
def signals_deferred():
    """While a job records itself, SIGTERM and SIGINT stop it between two store calls, not inside one.

    A signal raised inside a SQLite write leaves that connection mid-transaction: the
    KILLED record written next would wait on the job's own lock. Store calls check
    `raise_deferred()` first (pipeline.tracking's client), and the end of the block raises
    a signal that came after the last one, so the record still ends KILLED.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hold(signum, frame):
        _DEFERRED["signal"] = signum

    previous = {s: signal.signal(s, hold) for s in (signal.SIGTERM, signal.SIGINT)}
    _DEFERRED.update(signal=None, active=True)
    try:
        yield
        raise_deferred()
    finally:
        _DEFERRED["active"] = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_deferred() -> None:
    """Raise the signal held by signals_deferred, at a point where stopping is safe (main thread only)."""
    if _DEFERRED["signal"] is not None and threading.current_thread() is threading.main_thread():
        signum, _DEFERRED["signal"] = _DEFERRED["signal"], None
        raise _interrupt(signum)


def first_line(err: BaseException) -> str:
    """An exception's first message line (its type's name when the message is empty), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def typed_line(err: BaseException) -> str:
    """`Type: first line` of a third party's exception, whose type often says as much as its text."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
