"""Entry point: `python -m pipeline [overrides]` (one build) or `-m` (a sweep).

Kept thin: Hydra composes and checks the config, the runner does the work, and the
value returned is the metric a sweeper optimises (p50 latency; NaN for a failed job).

Hydra reports the mistakes it catches itself (an option that does not exist, a misspelled
key, a wrong type, an override it cannot parse, a run folder it cannot create) in several
lines and exits 1. They are mistakes in the request like any other, so entry() turns them
into the pipeline's shape: one `error:` line (Hydra's list of choices kept) and exit 2.
HYDRA_FULL_ERROR=1, PIPELINE_DEBUG=1 or verbose=true let the exception through with its
traceback; errors raised by the job's own code keep Hydra's report.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # before anything that takes time: a signal in the first second is recorded too
    from pipeline.errors import hold_signals

    hold_signals()
    from pipeline import worker

    worker.start_early(sys.argv[1:])  # torch's import in the stage worker's server overlaps composing

import hydra  # noqa: E402

import pipeline.config  # noqa: E402, F401  (registers the schemas)

# Frames from these folders are the job's own code: its errors are not Hydra's to explain.
JOB_CODE = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("pipeline", "stages"))
# Lines of Hydra's messages that do not fit one line or give advice our schema refuses
# ("+key" only adds keys the schema allows).
DROPPED = ("To append to your config", "See https://", "reference_type=", "object_type=",
           "Set the environment variable HYDRA_FULL_ERROR")
GRAMMAR = "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> float | None:
    from pipeline.cli import run_job

    return run_job(cfg)


def debugging() -> bool:
    """Tracebacks asked for: HYDRA_FULL_ERROR=1, PIPELINE_DEBUG=1 or a verbose=true override."""
    verbose = {"verbose=true", "verbose=yes", "verbose=on", "verbose=1"}
    return (any(os.environ.get(name) == "1" for name in ("HYDRA_FULL_ERROR", "PIPELINE_DEBUG"))
            or any(arg.lstrip("+").lower() in verbose for arg in sys.argv[1:]))


def from_job(err: BaseException) -> bool:
    """Raised (or passed through) by the job's code, not by Hydra composing or preparing the run."""
    import traceback

    frames = list(traceback.walk_tb(err.__traceback__))[1:]  # the first is the frame that caught it
    return any(frame.f_code.co_filename.startswith(JOB_CODE) for frame, _ in frames)


def flatten_message(text: str) -> str:
    """Hydra's message on one line: indented lists joined after their heading, hints dropped."""
    parts: list[str] = []
    for raw in text.split("Config search path:")[0].splitlines():
        line = raw.strip()
        if not line or line.startswith(DROPPED):
            continue
        if raw[:1].isspace() and parts and parts[-1].endswith((":", ",")):  # an item of a list
            parts[-1] = f"{parts[-1]} {line},"
        else:
            parts.append(line)
    return "; ".join(p.rstrip(",").rstrip(".") for p in parts) + "."


def request_error(err: Exception) -> str | None:
    """One line (problem and fix) for a mistake Hydra caught in the request; None for anything else."""
    from hydra.errors import (
        HydraException,
        InstantiationException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

    from pipeline.errors import ConfigError

    if isinstance(err, InterpolationResolutionError):  # a ${...} in an override: resolved by the job
        return ConfigError(flatten_message(str(err)),
                           "make each ${...} name an existing key, e.g. paths.cache=${paths.outputs}/cache.").one_line()
    if from_job(err) or isinstance(err, InstantiationException):
        return None
    text = str(err)
    if isinstance(err, HydraException) and isinstance(err.__cause__, OmegaConfBaseException):
        text = f"{text}\n{err.__cause__}"
    if isinstance(err, MissingConfigException):
        fix = "choose one of the available options" + (
            f", or add conf/{err.missing_cfg_file}.yaml" if err.missing_cfg_file else "") + "."
    elif isinstance(err, OverrideParseException):
        if err.override and err.override not in text:
            text = f"cannot parse override {err.override!r}: {text}"
        fix = f"write each override as key=value and quote values holding spaces or brackets (see {GRAMMAR})."
    elif isinstance(err, (HydraException, OmegaConfBaseException)):
        fix = "check the key and its type against `python -m pipeline --cfg job`."
    elif isinstance(err, OSError):
        text = f"could not prepare the run folder: {err}"
        fix = "point paths.outputs (or hydra.run.dir / hydra.sweep.dir) at a writable directory."
    else:
        return None
    return ConfigError(flatten_message(text), fix).one_line()


def install_error_report():
    """Route Hydra's own error report through request_error; returns the function that undoes it.

    Hydra 1.3 runs every command through hydra._internal.utils.run_and_report, which prints
    the error and exits 1. The wrapper sees the exception first: a mistake in the request
    prints one line and exits 2 (SystemExit passes through Hydra's handler); anything else
    goes on to Hydra's handler as before.
    """
    from hydra._internal import utils

    from pipeline.errors import PipelineError

    original = getattr(utils, "run_and_report", None)
    if original is None:  # another Hydra: its own report stands
        return lambda: None

    def run_and_report(func):
        if debugging():
            return func()  # the exception and its whole traceback

        def guarded():
            try:
                return func()
            except PipelineError as err:  # raised before any job: a sweep's store that cannot be used
                print(f"error: {err.one_line()}", file=sys.stderr, flush=True)
                sys.exit(err.exit_code)
            except Exception as err:
                line = request_error(err)
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr, flush=True)
                sys.exit(2)

        return original(guarded)

    utils.run_and_report = run_and_report
    return lambda: setattr(utils, "run_and_report", original)


def entry() -> None:
    """Run Hydra; after a sweep, finish its summary (even if Hydra failed) and exit with its status
    (1: a job failed, 4: results that did not reach MLflow, see sweep.finalize)."""
    import signal

    from pipeline import sweep, worker
    from pipeline.errors import held_signal

    restore = install_error_report()
    try:
        main()
    except KeyboardInterrupt as err:  # between a sweep's jobs (each job handles its own)
        signum = signal.SIGTERM if getattr(err, "signal_name", "") == "SIGTERM" else signal.SIGINT
        print(f"error: interrupted by {signal.Signals(signum).name}.", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        restore()
        worker.stop_unused()
        status = sweep.finalize() if sweep.STATE else 0
    if held_signal():  # arrived before any job could record it
        print(f"error: interrupted by {signal.Signals(held_signal()).name}.", file=sys.stderr, flush=True)
        sys.exit(128 + held_signal())
    if status:
        sys.exit(status)


def leave(code: int | str | None) -> None:
    """Exit with `code` once the exit handlers ran and the streams are flushed, without the interpreter's
    teardown of every module: with MLflow's stack loaded (SQLAlchemy, its store) that teardown takes
    about a second of a run's wall time here, and every artifact and record is on disk by now. A thread
    still working (not a daemon) gets the normal exit, which waits for it."""
    import atexit
    import threading

    if isinstance(code, str):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    code = code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # logging's flush, multiprocessing's children, MLflow's own handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        entry()
        exit_code = 0
    except SystemExit as done:  # every planned exit (errors, sweeps' statuses, signals) raises it
        exit_code = done.code
    leave(exit_code)
