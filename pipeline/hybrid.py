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
pickled modules) load only with trusted=True or when they are the very files of the
user's own local cache (pipeline.cache.linked_from). README "Trust and security".
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from pipeline import input_guard, layout, programs, segments, targets
from pipeline.cache import linked_from
from pipeline.errors import ArtifactError
from pipeline.files import load_json, require_manifest

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
             trusted: bool = True):
    """Fuse the lowered program by the recipe and swap each segment for its engine.

    trusted=False (pipeline.load): recorded imports follow pipeline.programs' rule, and a
    target whose engines are code loads them only from the user's own cache.
    """
    recipe = load_json(partition_dir / layout.PARTITION.recipe, "partition recipe")
    engines = load_json(build_dir / layout.BUILD.engines, "engine list")
    built = {seg["name"]: seg for seg in engines["segments"]}
    for segment in built.values():
        for key in FILE_KEYS:
            if segment.get(key) is not None:
                inside(build_dir, segment[key], f"segment {segment['name']}'s {key}")
    code_ok = trusted or allow_code(build_dir, target)
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


def inside(folder: Path, name: Any, what: str) -> Path:
    """`folder / name`, if `name` is a relative path that stays in `folder` (links resolved)."""
    path = folder / name if isinstance(name, str) and name else None
    if path is None or Path(name).is_absolute() or ".." in Path(name).parts \
            or not path.resolve().is_relative_to(folder.resolve()):
        raise ArtifactError(f"{folder / layout.BUILD.engines}: {what} is {name!r}, a path outside {folder}.",
                            "a run folder names only its own files: rebuild it, and do not load folders "
                            "from unknown sources.")
    return path


def allow_code(build_dir: Path, target) -> bool:
    """True where the engines are no code, or the whole build folder is an entry of this user's own cache.

    Every file of the folder (its manifest included) must be that entry's very file: a
    run folder linked from your cache, not one copied from elsewhere.
    """
    if not target.engines_are_code:
        return True
    run_dir = build_dir.parent
    cache = own_cache_root(run_dir)
    names = [f["path"] for f in require_manifest(build_dir, "the build output of this run")["files"]]
    if cache is not None and linked_from(build_dir, cache, [*names, layout.MANIFEST]):
        return True
    raise ArtifactError(
        f"{run_dir} holds {target.name} engines, which are compiled code (shared libraries or pickled "
        "modules): loading them runs whatever their author put in them, and they are not files of your "
        "own local cache (hard links into the run's paths.cache, owned by you, writable by no one else).",
        "load run folders of other people only if you trust them: pipeline.load(run_dir, trusted=True); "
        "or rebuild the run yourself from its config.yaml.")


def own_cache_root(run_dir: Path) -> Path | None:
    """paths.cache of the run's config.yaml (relative paths from the current folder), unresolved text refused."""
    config_file = run_dir / layout.RUN_CONFIG
    if not config_file.is_file():
        return None
    from omegaconf import OmegaConf  # YAML only: loading a config runs no code

    paths = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False).get("paths") or {}
    cache = paths.get("cache") if isinstance(paths, dict) else None
    return Path(cache).resolve() if isinstance(cache, str) and "${" not in cache else None


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


def load(run_dir: str | Path, imports: tuple[str, ...] = (), trusted: bool = False):
    """Rebuild a run's compiled module as a callable torch.nn.Module (see the module docstring on trust)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir} is not a run folder.",
                            "pass the folder a pipeline run printed (outputs/runs/<date>/<time>).")
    for stage in layout.LOAD_STAGES:
        require_manifest(run_dir / stage, f"the {stage} output of this run")
    build_dir = run_dir / "build"
    engines = load_json(build_dir / layout.BUILD.engines, "engine list")
    target = targets.target_class(engines["target"])(run_settings(run_dir, engines))
    imports = tuple(imports)
    if engines.get("package"):  # the target's own format of the whole program (torch_tensorrt.save)
        package = inside(build_dir, engines["package"], "the package")
        if not trusted:
            allow_code(build_dir, target)
        for module in imports:
            importlib.import_module(module)
        return input_guard.guard(target.load_package(package), input_guard.spec_of_run(run_dir))
    module = assemble(run_dir / "lower", run_dir / "partition", build_dir, target, imports, trusted=trusted)
    return input_guard.guard(module, input_guard.spec_of_run(run_dir))
