"""The compiled program: engines for accelerated segments, PyTorch for the rest.

It is rebuilt from files alone (the lowered program, the partition recipe, the engines),
so `pipeline.load(run_dir)` in a fresh process gives the module validate measured.
Engines are loaded by their target with the run-time settings of whoever loads them
(validate: the job's own target; `load`: the run's config.yaml), since those settings
are in no build key and a cached build may come from a job that set them otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import layout, programs, segments, targets
from pipeline.errors import ArtifactError
from pipeline.files import load_json, require_manifest


class EngineModule(torch.nn.Module):
    """One segment's engine as a submodule of the hybrid program.

    `runner` is what the target's load_engine returned (a callable: tensors in, a tuple
    out). With truncate_long_and_double the engine takes float64 inputs as float32, as
    Torch-TensorRT's casts do.
    """

    def __init__(self, runner, truncate_double: bool = False):
        super().__init__()
        self.runner = runner
        self.truncate_double = truncate_double

    def forward(self, *args):
        if self.truncate_double:
            args = tuple(a.to(torch.float32) if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a
                         for a in args)
        return self.runner(*args)

    def extra_repr(self) -> str:
        return repr(self.runner)


def assemble(lower_dir: Path, partition_dir: Path, build_dir: Path, target):
    """Fuse the lowered program by the recipe and swap each segment for its engine."""
    recipe = load_json(partition_dir / layout.PARTITION.recipe, "partition recipe")
    engines = load_json(build_dir / layout.BUILD.engines, "engine list")
    gm = segments.fuse(target.graph_module(programs.load(lower_dir)), recipe)
    options = target.runtime_options(gm)
    built = {seg["name"]: seg for seg in engines["segments"]}
    for name, _ in segments.accelerated(gm):
        if name not in built:
            raise ArtifactError(f"{build_dir} has no engine for segment {name}.",
                                "the build and partition outputs are out of step: run the pipeline again.")
        runner = target.load_engine(built[name], build_dir, options)
        setattr(gm, name, EngineModule(runner, bool(built[name].get("truncated_double"))))
    return gm  # exported programs are already in eval mode (and refuse .eval())


def run_settings(run_dir: Path, engines: dict[str, Any]) -> dict[str, Any]:
    """The build's settings, with the run-time settings of the run's own config where it has one."""
    name = engines["target"]
    settings = {**targets.default_settings(name), **engines["settings"]}
    config_file = run_dir / layout.RUN_CONFIG
    if config_file.is_file():
        from omegaconf import OmegaConf  # YAML only: loading a config runs no code

        job_target = OmegaConf.to_container(OmegaConf.load(config_file)).get("target") or {}
        if job_target.get("name") == name:
            runtime = targets.target_class(name).runtime_settings
            settings.update({k: v for k, v in job_target.items() if k in runtime})
    return settings


def load(run_dir: str | Path):
    """Rebuild a run's compiled module as a callable torch.nn.Module."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir} is not a run folder.",
                            "pass the folder a pipeline run printed (outputs/runs/<date>/<time>).")
    for stage in layout.LOAD_STAGES:
        require_manifest(run_dir / stage, f"the {stage} output of this run")
    engines = load_json(run_dir / "build" / layout.BUILD.engines, "engine list")
    target = targets.target_class(engines["target"])(run_settings(run_dir, engines))
    if engines.get("package"):  # the target's own format of the whole program (torch_tensorrt.save)
        return target.load_package(run_dir / "build" / engines["package"])
    return assemble(run_dir / "lower", run_dir / "partition", run_dir / "build", target)
