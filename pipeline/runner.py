"""The orchestrator: runs the stages in order through the cache, records timings and errors.

Paths are decided here and nowhere else. What a stage depends on, where it runs and
how it is reused is the cache's business (pipeline.cache): the runner hands it each
stage's spec and a function that runs the stage, and records what came back.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from pipeline import env, layout, ops, shapes, targets
from pipeline.cache import StageCache, select
from pipeline.checks import check_settings
from pipeline.config import check_known_keys
from pipeline.errors import CompileError, PipelineError, terminate_as_interrupt
from pipeline.files import load_json, write_json
from pipeline.stage import StageSpec
from pipeline.tracking.recovery import process_identity
from pipeline.worker import Request, StageWorker, disk_full, reraise


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


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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

    def run_stage(self, spec: StageSpec, keys: dict[str, str], target) -> StageRecord:
        """One stage through the cache: linked if an entry exists, else run by the worker and published."""
        material = self.cache.material(spec, self.config, target, self.run_dir, keys)
        visible = select(self.config, spec.reads + spec.labels)

        def execute(staging: Path):
            request = Request(stage=spec.name, config=visible, target=target.name, settings=target.settings,
                              inputs={up: str((self.run_dir / up).resolve()) for up in spec.inputs},
                              out=str(staging.resolve()), job_pid=os.getpid())
            with self.console.status(f"{spec.name}: running in the stage worker"):
                reply = self.worker.run(request)
            if reply.text.strip():
                self.console.print(reply.text.rstrip("\n"), markup=False, highlight=False)
            if reply.error is not None:
                reraise(reply, request)
            return reply.metrics, reply.notes

        try:
            outcome = self.cache.obtain(spec, material, self.run_dir, execute, cached=spec.is_cached(self.config),
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
        # Started first: the child's start overlaps opening MLflow and the checks below.
        self.worker = StageWorker()
        self.console.print(f"[bold]target[/]: {escape(self.target_reason)}")
        name = f"{self.config['model']['name']}-{self.target_name}"
        if self.sweep:
            name = f"{name}-{self.sweep['id']}-{self.sweep['job']}"
        tracker.start(run_name=name, params=flatten(self.config), tags=self.tags())
        self.write_run_files(result)  # run.json exists (RUNNING) from before the first stage
        try:
            with terminate_as_interrupt():
                self.run_stages(result, tracker)
                self.check_validation()
            result.status = "FINISHED"
        except KeyboardInterrupt as err:
            result.status, result.error = "KILLED", f"interrupted by {getattr(err, 'signal_name', 'SIGINT')}"
            raise
        except BaseException as err:
            result.status = "FAILED"
            result.error = err.one_line() if hasattr(err, "one_line") else f"{type(err).__name__}: {err}"
            raise
        finally:
            self.worker.close()
            result.wall_seconds = time.perf_counter() - started
            self.finish(result, tracker)
        return result

    def run_stages(self, result: JobResult, tracker) -> None:
        """Check what can be checked cheaply, then every stage in order, each keyed by its inputs' keys."""
        from stages import ORDER  # the runner is the one module of pipeline/ that knows the stages

        check_settings(self.config)  # ranges and paths: before the target, before any stage
        target = targets.make(self.target_name, self.config["target"])
        target.configure(OmegaConf.create(self.config["compile"]))
        # Fail on a bad op name or input spec before any heavy work.
        ops.resolve(self.config["compile"]["torch_executed_ops"])
        shapes.check(OmegaConf.create(self.config["input"]))
        self.cache.remove_dead_staging()  # what jobs killed outright left behind
        keys: dict[str, str] = {}
        for spec in ORDER:
            record = self.run_stage(spec, keys, target)
            keys[spec.name] = record.key
            result.stages.append(record)
            result.metrics.update({k: v for k, v in record.metrics.items() if isinstance(v, (int, float))})
            result.tags.update({k: v for k, v in record.metrics.items() if isinstance(v, str)})
            result.metrics[f"{spec.name}_seconds"] = record.seconds
            self.console.print(f"[green]done[/] {spec.name:<9} {'cache hit' if record.hit else 'built':<9} "
                               f"{record.seconds:6.2f}s")
            run_id = tracker.opened()  # a store that failed to open stops the job here, not at the end
            if run_id:
                result.tracking["run_id"] = run_id
            write_json(self.run_dir / layout.RUN_JSON, result.as_dict())

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
            recorded = tracker.finish(result, self.run_dir)
            if recorded:
                result.tracking = {**result.tracking, **recorded, "recorded": True}
        except PipelineError as err:
            result.tracking.update(recorded=False, error=err.one_line())
            write_json(self.run_dir / layout.RUN_JSON, result.as_dict())
            if result.status == "FINISHED":
                raise  # exit 4: finished, results on disk, not in MLflow (python -m pipeline.tracking sync)
            self.console.print(f"[yellow]warning:[/] {escape(err.one_line())}")
            return
        write_json(self.run_dir / layout.RUN_JSON, result.as_dict())

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
                "model": self.config["model"]["name"], "device": info["device"],
                "compute_capability": info["compute_capability"]}
        tags.update({f"lib.{k}": v for k, v in env.libraries().items()})
        return tags

    def write_run_files(self, result: JobResult) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(self.config), self.run_dir / layout.RUN_CONFIG)
        write_json(self.run_dir / layout.RUN_JSON, result.as_dict())
        (self.run_dir / layout.CONSOLE_LOG).write_text(self.console.export_text(clear=False))
