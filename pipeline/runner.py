"""The orchestrator: stage order, cache lookup and publish, timings, error tiers.

Paths are decided here and nowhere else. Each stage runs in a staging folder inside the
cache and is published by a rename only when it finished, so a failed stage leaves
nothing behind; the run folder then gets hard links to the entries it used.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from pipeline import env, shapes, targets
from pipeline.errors import CompileError, ConfigError, PipelineError
from pipeline.stage import StageContext
from pipeline.store import (
    MANIFEST,
    Store,
    cache_key,
    link_tree,
    load_json,
    publish_folder,
    write_json,
)


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
    tracking: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "error": self.error, "target": self.target,
            "target_reason": self.target_reason, "wall_seconds": self.wall_seconds,
            "stage_seconds": sum(s.seconds for s in self.stages),
            "stages": [s.__dict__ for s in self.stages], "metrics": self.metrics, "tags": self.tags,
            "tracking": self.tracking,
        }


def select(config: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """The nested subset of `config` at the dotted `paths` a stage declares it reads."""
    subset: dict[str, Any] = {}
    for path in paths:
        *parents, leaf = path.split(".")
        src, dst = config, subset
        for part in parents:
            src = src[part]
            dst = dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    return subset


def check_known_keys(container: dict[str, Any]) -> None:
    """Reject keys the schema lacks: Hydra lets `+key=value` past the schema check."""
    from omegaconf.errors import ConfigKeyError

    from pipeline.config import TARGET_SCHEMAS, Config

    target = container["target"]
    try:
        OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in container.items() if k != "target"})
        if target.get("name") in TARGET_SCHEMAS:
            OmegaConf.merge(OmegaConf.structured(TARGET_SCHEMAS[target["name"]]), target)
    except ConfigKeyError as err:
        raise ConfigError(f"unknown setting: {str(err).splitlines()[0]}.",
                          "check the spelling against `python -m pipeline --cfg job`; "
                          "'+' only adds keys that the schema allows (e.g. model.kwargs).") from None


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
        self.store = Store(Path(container["paths"]["cache"]).resolve())

    def input_identities(self, stage, keys: dict[str, str]) -> dict[str, Any]:
        """Upstream keys, or for inputs a stage reads only a few files of (CONTENT), those files' hashes.

        Convert reads nothing of partition but its recipe: sweeps over min_block_size that end
        in the same split then share convert and build, not only export and lower.
        """
        identities: dict[str, Any] = {}
        for up in stage.INPUTS:
            files = getattr(stage, "CONTENT", {}).get(up)
            if files is None:
                identities[up] = keys[up]
                continue
            manifest = load_json(self.run_dir / up / MANIFEST, f"the {up} manifest")
            digests = {f["path"]: f["sha256"] for f in manifest["files"]}
            identities[up] = {name: digests[name] for name in files}
        return identities

    def run_stage(self, stage, keys: dict[str, str], target, fingerprint: dict) -> StageRecord:
        subset = select(self.config, stage.READS)
        for attr in getattr(stage, "TARGET_KEYS", ()):  # what the target object says, not its config
            subset.setdefault("target", {})[attr] = getattr(target, attr)
        key = cache_key({"stage": stage.NAME, "version": stage.VERSION, "config": subset,
                         "inputs": self.input_identities(stage, keys), "env": fingerprint})
        started = time.perf_counter()
        if stage.NAME == "validate" and not self.config["validate"]["cache"]:
            # Measurements are of this moment on this machine: by default never reused.
            staging = self.run_dir / f".{stage.NAME}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            manifest = self._execute(stage, key, subset, keys, target, fingerprint, staging,
                                     final=self.run_dir / stage.NAME)
            return StageRecord(stage.NAME, key, False, manifest["wall_seconds"], manifest["metrics"],
                               manifest["notes"])
        # Readers share the key's lock, so `python -m pipeline.cache prune` never removes an
        # entry between a job finding it and linking it into its run folder.
        with self.store.lock(stage.NAME, key, shared=True):
            manifest = self.store.lookup(stage.NAME, key)
            if manifest is not None:
                link_tree(self.store.entry(stage.NAME, key), self.run_dir / stage.NAME)
        hit = manifest is not None
        if not hit:
            with self.store.lock(stage.NAME, key):
                manifest = self.store.lookup(stage.NAME, key)  # a parallel job may have built it
                hit = manifest is not None
                if not hit:
                    manifest = self._execute(stage, key, subset, keys, target, fingerprint,
                                             self.store.staging(stage.NAME, key),
                                             final=self.store.entry(stage.NAME, key))
                link_tree(self.store.entry(stage.NAME, key), self.run_dir / stage.NAME)
        seconds = time.perf_counter() - started if hit else manifest["wall_seconds"]
        return StageRecord(stage.NAME, key, hit, seconds, manifest["metrics"], manifest["notes"])

    def _execute(self, stage, key, subset, keys, target, fingerprint, staging: Path, final: Path) -> dict:
        ctx = StageContext(config=OmegaConf.create(subset, flags={"readonly": True}), target=target,
                           inputs={up: self.run_dir / up for up in stage.INPUTS}, out=staging,
                           console=self.console)
        started = time.perf_counter()
        try:
            metrics = stage.run(ctx)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = {
            "stage": stage.NAME, "version": stage.VERSION, "key": key,
            "inputs": {up: keys[up] for up in stage.INPUTS}, "config": subset, "env": fingerprint,
            "target": target.name, "wall_seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": metrics, "notes": ctx.notes,
        }
        publish_folder(staging, final, manifest)
        return manifest

    def run(self, tracker) -> JobResult:
        from stages import ORDER

        result = JobResult(run_dir=self.run_dir, target=self.target_name, target_reason=self.target_reason)
        started = time.perf_counter()
        self.console.print(f"[bold]target[/]: {self.target_reason}")
        name = f"{self.config['model']['name']}-{self.target_name}"
        if self.sweep:
            name = f"{name}-{self.sweep['id']}-{self.sweep['job']}"
        tracker.start(run_name=name, params=flatten(self.config), tags=self.tags())
        try:
            target = targets.make(self.target_name, self.config["target"])
            target.configure(OmegaConf.create(self.config["compile"]))
            # Fail on a bad op name or input spec before any heavy work.
            from stages.partition import resolve_ops
            resolve_ops(self.config["compile"]["torch_executed_ops"])
            shapes.check(OmegaConf.create(self.config["input"]))
            fingerprint = env.fingerprint()
            keys: dict[str, str] = {}
            for stage in ORDER:
                record = self.run_stage(stage, keys, target, fingerprint)
                keys[stage.NAME] = record.key
                result.stages.append(record)
                result.metrics.update({k: v for k, v in record.metrics.items() if isinstance(v, (int, float))})
                result.tags.update({k: v for k, v in record.metrics.items() if isinstance(v, str)})
                result.metrics[f"{stage.NAME}_seconds"] = record.seconds
                self.console.print(f"[green]done[/] {stage.NAME:<9} {'cache hit' if record.hit else 'built':<9} "
                                   f"{record.seconds:6.2f}s")
            report = load_json(self.run_dir / "validate" / "report.json", "validation report")
            if not report["passed"]:
                raise CompileError(
                    f"validation failed: {'; '.join(report['failures'])}.",
                    f"see {self.run_dir / 'validate' / 'report.json'}; keep sensitive ops in PyTorch "
                    f"(compile.torch_executed_ops) or adjust validate.tolerances.{self.config['compile']['precision']}.",
                )
            result.status = "FINISHED"
        except KeyboardInterrupt:
            result.status, result.error = "KILLED", "interrupted"
            raise
        except BaseException as err:
            result.status = "FAILED"
            result.error = err.one_line() if hasattr(err, "one_line") else f"{type(err).__name__}: {err}"
            raise
        finally:
            result.wall_seconds = time.perf_counter() - started
            self.write_run_files(result)
            try:
                result.tracking = tracker.finish(result, self.run_dir)
            except PipelineError as err:
                if result.status == "FINISHED":
                    raise
                # The job's own error matters more; still say that tracking failed too.
                self.console.print(f"[yellow]warning:[/] {err.one_line()}")
            write_json(self.run_dir / "run.json", result.as_dict())
        return result

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
                **self.sweep_tags(),
                "model": self.config["model"]["name"], "device": info["device"],
                "compute_capability": info["compute_capability"]}
        tags.update({f"lib.{k}": v for k, v in env.libraries().items()})
        return tags

    def write_run_files(self, result: JobResult) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(self.config), self.run_dir / "config.yaml")
        write_json(self.run_dir / "run.json", result.as_dict())
        (self.run_dir / "console.log").write_text(self.console.export_text(clear=False))
