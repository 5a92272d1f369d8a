"""The orchestrator: runs the stages in order through the cache, records timings and errors.

Paths are decided here and nowhere else. What a stage depends on, where it runs and
how it is reused is the cache's business (pipeline.cache): the runner hands it each
stage's spec and a function that runs the stage, and records what came back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from pipeline import env, gpu_lease, layout, naming, ops, payoff, shapes, targets
from pipeline.cache import StageCache, select
from pipeline.checks import check_settings, check_target
from pipeline.config import check_known_keys
from pipeline.errors import (
    CompileError,
    PipelineError,
    signals_blocked,
    signals_deferred,
    terminate_as_interrupt,
)
from pipeline.files import load_json, write_json
from pipeline.stage import StageSpec
from pipeline.tracking.recovery import close_dead_folders, process_identity
from pipeline.worker import MEMORY_CHECK, Request, StageWorker, disk_full, reraise


@dataclass
class StageRecord:
    name: str
    key: str
    hit: bool
    seconds: float
    metrics: dict[str, Any]
    notes: list[str]


@dataclass
class JobResult:
    run_dir: Path
    target: str
    target_reason: str
    status: str = "RUNNING"
    error: str | None = None
    stages: list[StageRecord] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    # Text results of stages (e.g. precision.achieved), logged as MLflow tags.
    tags: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    tracking: dict[str, Any] = field(default_factory=dict)
    # host, pid and its start time: lets the next job tell whether a RUNNING record is alive.
    process: dict[str, str] = field(default_factory=process_identity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "error": self.error, "target": self.target,
            "target_reason": self.target_reason, "wall_seconds": self.wall_seconds,
            "stage_seconds": sum(s.seconds for s in self.stages),
            "stages": [s.__dict__ for s in self.stages], "metrics": self.metrics, "tags": self.tags,
            "tracking": self.tracking, "process": self.process,
        }


class Runner:
    def __init__(self, cfg: DictConfig, run_dir: Path, console: Console, sweep: dict[str, Any] | None = None):
        self.console = console
        self.run_dir = run_dir
        # The sweep this job is one of (pipeline.sweep.job_context), or None for a single run.
        self.sweep = sweep
        container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        container.pop("hydra", None)
        check_known_keys(container)
        self.requested = container["target"]["name"]
        name, settings, self.target_reason = targets.resolve(container["target"])
        container["target"] = settings
        self.config: dict[str, Any] = container
        self.target_name = name
        self.cache = StageCache(Path(container["paths"]["cache"]).resolve())
        self.resolved: dict[str, Any] = {}
        self.lease: gpu_lease.Lease | None = None  # a CUDA job's GPU of this node, held to the job's end

    def run_stage(self, spec: StageSpec, keys: dict[str, str], target, config: dict[str, Any] | None = None,
                  run_dir: Path | None = None, resolved: dict[str, Any] | None = None) -> StageRecord:
        """One stage through the cache: linked if an entry exists, else run by the worker and published.

        `config`, `run_dir` and `resolved` differ from the job's for the baseline chain of an int8 job
        (pipeline.payoff), which resolves its own once."""
        config, run_dir, resolved = config or self.config, run_dir or self.run_dir, resolved or self.resolved
        reads = spec.reads_for(config, target)  # once: it keys the stage and is all the stage sees
        material = self.cache.material(spec, config, target, run_dir, keys, reads)
        visible = select(config, reads + spec.labels)

        def execute(staging: Path):
            request = Request(stage=spec.name, config=visible, target=target.name, settings=target.settings,
                              inputs={up: str((run_dir / up).resolve()) for up in spec.inputs},
                              out=str(staging.resolve()), job_pid=os.getpid(), resolved=resolved)
            with self.console.status(f"{spec.name}: running in the stage worker"):
                reply = self.worker.run(request)
            if reply.text.strip():
                self.console.print(reply.text.rstrip("\n"), markup=False, highlight=False)
            if reply.error is not None:
                reraise(reply, request)
            return reply.metrics, reply.notes

        try:
            outcome = self.cache.obtain(spec, material, run_dir, execute, cached=spec.is_cached(config),
                                        extra={"upstream": {up: keys[up] for up in spec.inputs},
                                               "target_name": target.name})
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise disk_full(spec.name, Path(err.filename or self.cache.root)) from None
        return StageRecord(spec.name, outcome.key, outcome.hit, outcome.seconds, outcome.manifest["metrics"],
                           outcome.manifest["notes"])

    def run(self, tracker) -> JobResult:
        result = JobResult(run_dir=self.run_dir, target=self.target_name, target_reason=self.target_reason)
        started = time.perf_counter()
        # Run folders of jobs killed outright (tracked or not) closed FAILED, while this job works.
        tidy = threading.Thread(target=close_dead_folders, args=(Path(self.config["paths"]["outputs"]),), daemon=True)
        tidy.start()
        self.console.print(f"[bold]target[/]: {escape(self.target_reason)}")
        self.current_stage = "checks"
        if self.sweep:
            name = naming.child_name(self.sweep["overrides"], self.sweep.get("swept", []), self.target_name)
        else:
            name = naming.single_name(self.config["model"]["name"], self.target_name)
        result.tracking["run_name"] = name
        tracker.start(run_name=name, params=naming.params(self.config), tags=self.tags())
        self.worker = None
        try:
            with terminate_as_interrupt():
                target = self.settle_target(result)  # before the run files: config.yaml names what it resolved
                self.write_run_files(result)  # run.json exists (RUNNING) from before the first stage
                # Forked once the job is checked and MLflow opens: the fork waits for the server's imports.
                self.worker = StageWorker()
                self.run_stages(result, tracker, target)
                self.check_validation()
            result.status = "FINISHED"
        except KeyboardInterrupt as err:
            result.status, result.error = "KILLED", f"interrupted by {getattr(err, 'signal_name', 'SIGINT')}"
            raise
        except BaseException as err:
            result.status = "FAILED"
            result.error = err.one_line() if hasattr(err, "one_line") else f"{type(err).__name__}: {err}"
            result.tags["failed_stage"] = self.current_stage
            if isinstance(err, PipelineError):  # printed now, so the console.log sent to MLflow ends with it
                self.console.print("[red]error:[/] " + escape(result.error), soft_wrap=True)
                err.reported = True
            raise
        finally:
            if self.worker is not None:
                self.worker.close()
            if self.lease:
                result.tags.update(self.lease.release())
            tidy.join(10)  # a job that fails in a second still closes what dead jobs left
            result.wall_seconds = time.perf_counter() - started
            self.finish(result, tracker)
        return result

    def run_stages(self, result: JobResult, tracker, target) -> None:
        """Check what can be checked cheaply, then every stage in order, each keyed by its inputs' keys."""
        from stages import (  # the runner is the one module of pipeline/ that knows the stages
            BY_NAME,
            ORDER,
        )

        # Fail on a bad op name or input spec before any heavy work.
        ops.resolve(self.config["compile"]["torch_executed_ops"])
        shapes.check(OmegaConf.create(self.config["input"]))
        self.cache.remove_dead_staging()  # what jobs killed outright left behind
        # A CUDA job's GPU, before the memory check that reads its free memory (pipeline.gpu_lease).
        self.lease = gpu_lease.take(self.config, target.device(), self.worker, self.console.print)
        result.tags.update(self.lease.tags if self.lease else {})
        if self.config.get("check_memory", True):
            self.current_stage = "memory check"
            result.metrics.update(self.check_memory(target))
        keys: dict[str, str] = {}
        for spec in ORDER:
            keys[spec.name] = self.record_stage(result, tracker, spec, lambda s=spec: self.run_stage(s, keys, target))
        if payoff.wanted(self.config):  # int8/fp8: timed against the precision it replaces
            payoff.run(self, result, tracker, keys, target, BY_NAME)
        self.current_stage = "validation gate"
        result.tags.update(self.trust_tags(result))

    def check_memory(self, target) -> dict[str, float]:
        """The job's memory estimate against what the host and device have free, in the stage worker."""
        request = Request(stage=MEMORY_CHECK, config={k: self.config[k] for k in ("model", "input", "compile",
                                                                                 "validate")},
                          target=target.name, settings=target.settings, inputs={}, out=str(self.run_dir),
                          job_pid=os.getpid())
        with self.console.status("estimating the memory the job needs"):
            reply = self.worker.run(request)
        if reply.error is not None:
            reraise(reply, request)
        return reply.metrics

    def record_stage(self, result: JobResult, tracker, spec: StageSpec, run, label: str | None = None) -> str:
        """Run one stage (`run()` returns its StageRecord), record its metrics and timing; its key."""
        label = label or spec.name
        self.current_stage = label
        record = run()
        record.name = label
        result.stages.append(record)
        if label == spec.name:  # a baseline stage's figures are not the job's
            result.metrics.update({k: v for k, v in record.metrics.items() if isinstance(v, (int, float))})
            result.tags.update({k: v for k, v in record.metrics.items() if isinstance(v, str)})
        result.metrics[f"{label}_seconds"] = record.seconds
        result.metrics[f"{label}_cache_hit"] = float(record.hit)  # 0 s of a hit is no build time
        self.console.print(f"[green]done[/] {label:<9} {'cache hit' if record.hit else 'built':<9} "
                           f"{record.seconds:6.2f}s")
        run_id = tracker.opened()  # a store that failed to open stops the job here, not at the end
        if run_id:
            result.tracking["run_id"] = run_id
        write_json(self.run_dir / layout.RUN_JSON, result.as_dict())
        return record.key

    def settle_target(self, result: JobResult) -> targets.Target:
        """The job's target, made and configured; what it resolved (device=auto, providers, artifact)
        goes into the config (written to config.yaml after this) and the tags.

        pipeline.load rebuilds engines from config.yaml's target, so it must name the device used.
        """
        check_target(self.config)  # declared choices and ranges, the device asked for: before the target
        target = targets.make(self.target_name, self.config["target"])  # device resolved once, here
        check_settings(self.config, target)  # ranges, paths, what its quantizer serves: before any stage
        target.configure(self.config["compile"])  # the plain resolved dict: no DictConfig round trip
        choices = target.settle(self.config["input"])
        for key, value in choices.items():
            if not key.endswith(".reason"):
                self.console.print(f"[bold]{escape(key)}[/]: {escape(value)} ({escape(choices.get(key + '.reason', ''))})")
        result.tags.update(choices)
        self.config["target"].update({k: v for k, v in target.settings.items() if k in self.config["target"]})
        self.resolved = self.resolve(target)
        result.tags.update(env.device_tags(target.device()))
        self.console.print(f"[bold]device[/]: {escape(result.tags['device'])} ({escape(result.tags['device.name'])})")
        return target

    def resolve(self, target: targets.Target, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """What this job resolved once, for every stage (Request.resolved) and config.yaml's `resolved`.

        `config`: another chain's (an int8 job's fp32 baseline, pipeline.payoff), resolved for itself."""
        config = config or self.config
        precision, calibration = config["compile"]["precision"], config["calibration"]
        route = target.quantization_route(precision)
        return {"target": target.name, "device": target.device(), "trace_device": target.trace_device(),
                "precision": precision, "quantization": route,
                "quantize_mode": config["quantize"]["mode"] if route else None,
                "calibration_digest": calibration.get("digest") if route else None}

    def trust_tags(self, result: JobResult) -> dict[str, str]:
        """What a reader needs before believing a number: engine identity, latency spread, warnings."""
        build = next(s for s in result.stages if s.name == "build")
        digests = [f["sha256"] for f in load_json(self.run_dir / "build" / layout.MANIFEST, "build manifest")["files"]]
        tags = {"build.key": build.key, "engine.sha256": hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()}
        notes = [n for s in result.stages for n in s.notes]
        if notes:
            tags["warnings"] = " | ".join(notes)[:5000]
        m = result.metrics
        if m.get("validated"):
            # The engine's figures are the job's latency; eager, the speedup's baseline, is judged apart
            # (at batch 1 on a GPU it is bound by Python's kernel launches and rarely steady).
            limit = self.config["validate"]["spread_warn_threshold"]
            trusted = m.get("latency_median_spread", 0.0) <= limit
            eager_trusted = m.get("eager/latency_median_spread", 0.0) <= limit
            tags["latency.trusted"] = "true" if trusted else "false"
            tags["eager.latency.trusted"] = "true" if eager_trusted else "false"
            result.metrics["latency_trusted"] = float(trusted)
            # A speedup is a ratio of both: either side unsteady and it carries the `~`.
            result.metrics["speedup_trusted"] = float(trusted and eager_trusted)
            if "speedup" in m:
                from pipeline.ranking import speedup_text

                tags["speedup"] = speedup_text(m)  # with its `~` in MLflow's runs table too
        return tags

    def check_validation(self) -> None:
        path = self.run_dir / "validate" / layout.VALIDATE.report
        report = load_json(path, "validation report")
        if not report["passed"]:
            raise CompileError(
                f"validation failed: {'; '.join(report['failures'])}.",
                f"see {path}; keep sensitive ops in PyTorch (compile.torch_executed_ops) "
                f"or adjust validate.tolerances.{self.config['compile']['precision']}.",
            )

    def finish(self, result: JobResult, tracker) -> None:
        """Run files first, then MLflow; a tracking error never hides the job's own error."""
        self.write_run_files(result)
        try:
            with signals_deferred():  # a signal while MLflow records the job: recorded KILLED
                recorded = tracker.finish(result, self.run_dir)
                if recorded:
                    result.tracking = {**result.tracking, **recorded, "recorded": True}
                if recorded and result.status == "FINISHED" and self.config["register"] and not self.sweep:
                    self.register(result, tracker)
        except PipelineError as err:
            result.tracking.update(recorded=False, error=err.one_line())
            write_json(self.run_dir / layout.RUN_JSON, result.as_dict())
            if result.status == "FINISHED":
                raise  # exit 4: finished, results on disk, not in MLflow (python -m pipeline.tracking sync)
            self.console.print(f"[yellow]warning:[/] {escape(err.one_line())}")
            return
        except KeyboardInterrupt as err:  # the job ends for the signal, its record first
            result.status = "KILLED"
            result.error = f"interrupted by {getattr(err, 'signal_name', 'SIGINT')} while recording the run"
            with signals_blocked():
                write_json(self.run_dir / layout.RUN_JSON, result.as_dict())
                tracker.killed(result)
            raise
        write_json(self.run_dir / layout.RUN_JSON, result.as_dict())

    def register(self, result: JobResult, tracker) -> None:
        """register=true: the compiled program as a new version of a registered MLflow model."""
        if not result.metrics.get("validated"):
            self.console.print("[yellow]warning:[/] not registered: the engines cannot run on this machine")
            return
        with self.console.status("registering the compiled program in MLflow's model registry"):
            done = tracker.register(self.run_dir, self.config["model"]["name"])
        result.tracking["registered"] = done
        self.console.print(f"registered: {done['uri']} (version {done['version']}); serve it with "
                           f"mlflow models serve -m {done['uri']} --env-manager local", markup=False)

    def sweep_tags(self) -> dict[str, str]:
        if not self.sweep:
            return {}
        tags = {"sweep.id": self.sweep["id"], "sweep.job": str(self.sweep["job"]),
                "sweep.overrides": self.sweep["overrides"]}
        if self.sweep.get("parent"):
            tags["mlflow.parentRunId"] = self.sweep["parent"]["run_id"]
        return tags

    def tags(self) -> dict[str, str]:
        info = env.device_info()
        tags = {"target": self.target_name, "target.requested": self.requested,
                "run_dir": str(self.run_dir.resolve()),
                **self.sweep_tags(),
                "model": self.config["model"]["name"], "machine.device": info["device"],
                "compute_capability": info["compute_capability"]}
        tags.update({f"lib.{k}": v for k, v in env.libraries().items()})
        return tags

    def write_run_files(self, result: JobResult) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"resolved": self.resolved} if self.resolved else {}  # what the job decided, for readers
        OmegaConf.save(OmegaConf.create({**self.config, **resolved}), self.run_dir / layout.RUN_CONFIG)
        write_json(self.run_dir / layout.RUN_JSON, result.as_dict())
        (self.run_dir / layout.CONSOLE_LOG).write_text(self.console.export_text(clear=False))
