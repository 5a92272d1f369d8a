"""The compiled program: engines for accelerated segments, PyTorch for the rest.

It is rebuilt from files alone (the lowered program, the partition recipe, the engines),
so `pipeline.load(run_dir)` in a fresh process gives the module validate measured.
Engines are loaded by their target with the run-time settings of whoever loads them
(validate: the job's own target; `load`: the run's config.yaml), since those settings
are in no build key and a cached build may come from a job that set them otherwise.

A job trusts what it built or took from its own cache (validate and build call
`assemble` with the default trusted=True). `load` does not trust a run folder: every
file name read from its JSON must stay inside its folder, the program is loaded without
unpickling and imports only what the rules of pipeline.programs allow, and engines that
are code (a target's `engines_are_code`: AOTInductor's shared libraries, Torch-TensorRT's
pickled modules) load only with trusted=True or when the build's manifest carries this
user's provenance record (pipeline.provenance: a job of this user published it), which no
copied or extracted folder can carry. Every file read is a regular file of the folder that
its manifest lists (pipeline.files.check_manifest). docs/security.md lists each attack.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from pipeline import input_guard, layout, programs, provenance, segments, targets
from pipeline.errors import ArtifactError
from pipeline.files import confined, load_json, require_manifest
from pipeline.layout import MANIFEST

# Keys of a segment in engines.json that name files of the build folder.
FILE_KEYS = ("engine", "shapes", "network", "program", "layers", "args")


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


def assemble(lower_dir: Path, partition_dir: Path, build_dir: Path, target, imports: tuple[str, ...] = (),
             trusted: bool = True, manifest: dict[str, Any] | None = None):
    """Fuse the lowered program by the recipe and swap each segment for its engine.

    trusted=False (pipeline.load, which passes the build's checked `manifest`): recorded
    imports follow pipeline.programs' rule, every engine file must be one the manifest
    lists, and a target whose engines are code loads them only from the user's own builds.
    """
    recipe = load_json(partition_dir / layout.PARTITION.recipe, "partition recipe")
    engines = load_json(build_dir / layout.BUILD.engines, "engine list")
    built = {seg["name"]: seg for seg in engines["segments"]}
    listed = None if manifest is None else {f["path"] for f in manifest["files"]}
    for segment in built.values():
        for key in FILE_KEYS:
            if segment.get(key) is not None:
                inside(build_dir, segment[key], f"segment {segment['name']}'s {key}", listed)
    code_ok = trusted or allow_code(build_dir, target, manifest)
    gm = segments.fuse(target.graph_module(programs.load(lower_dir, imports, trusted=trusted)), recipe)
    programs.without_input_checks(gm)
    options = {**target.runtime_options(gm), "trusted": code_ok}
    for name, _ in segments.accelerated(gm):
        if name not in built:
            raise ArtifactError(f"{build_dir} has no engine for segment {name}.",
                                "the build and partition outputs are out of step: run the pipeline again.")
        runner = target.load_engine(built[name], build_dir, options)
        setattr(gm, name, EngineModule(runner, bool(built[name].get("truncated_double"))))
    return gm  # exported programs are already in eval mode (and refuse .eval())


def inside(folder: Path, name: Any, what: str, listed: set[str] | None = None) -> Path:
    """`folder / name`, if `name` is a relative path that stays in `folder` (links resolved) to a regular
    file that, given the names the folder's manifest lists, is one of those; or to nothing (a segment
    also names convert's files, which only some targets copy into build/)."""
    why = confined(folder, name, missing_ok=True)
    if not why and listed is not None and name not in listed and os.path.lexists(folder / name):
        why = f"{MANIFEST} does not list it"
    if why:
        raise ArtifactError(f"{folder / layout.BUILD.engines}: {what} is {name!r}, a path outside {folder} "
                            f"or no regular file ({why}).",
                            "a run folder names only its own files: rebuild it, and do not load folders "
                            "from unknown sources.")
    return folder / name


def allow_code(build_dir: Path, target, manifest: dict[str, Any] | None = None) -> bool:
    """True where the engines are no code, or this user's own job published the build (pipeline.provenance).

    The manifest's file hashes were checked (require_manifest), so a verified record covers
    every file the engines are loaded from.
    """
    if not target.engines_are_code:
        return True
    manifest = manifest or require_manifest(build_dir, "the build output of this run")
    if provenance.verify(manifest):
        return True
    raise ArtifactError(
        f"{build_dir.parent} holds {target.name} engines, which are compiled code (shared libraries or pickled "
        "modules): loading them runs whatever their author put in them, and this build was not made by your own "
        f"jobs (its manifest carries no provenance record of your key, {provenance.key_path()}).",
        "load run folders of other people only if you trust them: pipeline.load(run_dir, trusted=True); "
        "or rebuild the run yourself from its config.yaml.")


def run_settings(run_dir: Path, engines: dict[str, Any]) -> dict[str, Any]:
    """The build's settings, with the run-time settings of the run's own config where it has one."""
    name = engines["target"]
    settings = {**targets.default_settings(name), **engines["settings"]}
    config_file = run_dir / layout.RUN_CONFIG
    if not confined(run_dir, layout.RUN_CONFIG):  # a regular file of the folder (not a FIFO, not a link out)
        from omegaconf import OmegaConf  # YAML only: loading a config runs no code

        job_target = OmegaConf.to_container(OmegaConf.load(config_file)).get("target") or {}
        if job_target.get("name") == name:
            runtime = targets.target_class(name).runtime_settings
            settings.update({k: v for k, v in job_target.items() if k in runtime})
    return settings


def load(run_dir: str | Path, imports: tuple[str, ...] = (), trusted: bool = False):
    """Rebuild a run's compiled module as a callable torch.nn.Module (see the module docstring on trust)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir} is not a run folder.",
                            "pass the folder a pipeline run printed (outputs/runs/<date>/<time>).")
    manifests = {stage: require_manifest(run_dir / stage, f"the {stage} output of this run")
                 for stage in layout.LOAD_STAGES}
    build_dir = run_dir / "build"
    engines = load_json(build_dir / layout.BUILD.engines, "engine list")
    target = targets.target_class(engines["target"])(run_settings(run_dir, engines))
    imports = tuple(imports)
    if engines.get("package"):  # the target's own format of the whole program (torch_tensorrt.save)
        package = inside(build_dir, engines["package"], "the package",
                         {f["path"] for f in manifests["build"]["files"]})
        if not trusted:
            allow_code(build_dir, target, manifests["build"])
        for module in imports:
            importlib.import_module(module)
        return input_guard.guard(target.load_package(package), input_guard.spec_of_run(run_dir))
    module = assemble(run_dir / "lower", run_dir / "partition", build_dir, target, imports, trusted=trusted,
                      manifest=manifests["build"])
    return input_guard.guard(module, input_guard.spec_of_run(run_dir))
