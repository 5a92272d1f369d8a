"""The compiled program: engines for accelerated segments, PyTorch for the rest.

It is rebuilt from files alone (the lowered program, the partition recipe, the engines),
so `pipeline.load(run_dir)` in a fresh process gives the module validate measured.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import programs, segments, targets
from pipeline.errors import ArtifactError
from pipeline.store import load_json, require_manifest

RUN_STAGES = ("export", "lower", "partition", "build")


def truncating(engine):
    """An engine built with truncate_long_and_double takes float64 inputs as float32 (Torch-TensorRT's casts)."""
    import torch

    class TruncatingEngine(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*(a.to(torch.float32) if isinstance(a, torch.Tensor) and a.dtype == torch.float64
                                else a for a in args))

    return TruncatingEngine(engine)


def assemble(lower_dir: Path, partition_dir: Path, build_dir: Path):
    """Fuse the lowered program by the recipe and swap each segment for its engine."""
    recipe = load_json(partition_dir / "recipe.json", "partition recipe")
    engines = load_json(build_dir / "engines.json", "engine list")
    target = targets.target_class(engines["target"])(dict(engines["settings"]))
    gm = segments.fuse(target.graph_module(programs.load(lower_dir)), recipe)
    if target.settings.get("allow_spinning", False) is None:  # auto: spin only for a lone engine
        target.settings["allow_spinning"] = (len(segments.accelerated(gm)) == 1
                                             and not any(segments.is_compute(n) for n in gm.graph.nodes))
    built = {seg["name"]: seg for seg in engines["segments"]}
    for name, _ in segments.accelerated(gm):
        if name not in built:
            raise ArtifactError(f"{build_dir} has no engine for segment {name}.",
                                "the build and partition outputs are out of step: run the pipeline again.")
        engine = target.load_engine(built[name], build_dir)
        setattr(gm, name, truncating(engine) if built[name].get("truncated_double") else engine)
    return gm  # exported programs are already in eval mode (and refuse .eval())


def load(run_dir: str | Path):
    """Rebuild a run's compiled module as a callable torch.nn.Module."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir} is not a run folder.",
                            "pass the folder a pipeline run printed (outputs/runs/<date>/<time>).")
    for stage in RUN_STAGES:
        require_manifest(run_dir / stage, f"the {stage} output of this run")
    engines = load_json(run_dir / "build" / "engines.json", "engine list")
    if engines.get("package"):  # the target's own format of the whole program (torch_tensorrt.save)
        target = targets.target_class(engines["target"])(dict(engines["settings"]))
        return target.load_package(run_dir / "build" / engines["package"])
    return assemble(run_dir / "lower", run_dir / "partition", run_dir / "build")
