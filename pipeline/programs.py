"""Exported programs on disk, loaded without running code their author put in them.

A program can only be deserialised once the modules it needs are imported: the module
that registers a custom operator it calls, and the modules defining the types of its
inputs and outputs that pytree must know (a transformers model returns a ModelOutput,
registered when transformers.modeling_outputs is imported). The export stage records
exactly those in `imports.json`, so any later stage, a cache hit, or `pipeline.load` in a
fresh process imports them first.

Loading never unpickles. `torch.export.load` would: payloads whose config says
`use_pickle` (tensor subclasses), script and opaque objects, legacy `.pt` payloads, and a
`weights_only=False` retry of any torch.load that failed. So the archive is read first
and refused if it holds any of those (or compiled code); then, while torch reads it,
torch.load is held to weights_only=True and every other unpickler refuses, so a format
nobody foresaw cannot unpickle either.

Imports follow one rule (docs/security.md). A job trusts its own cache (`trusted=True`,
the default here, used by the stages): it imports what the entry recorded, which its cache
key ties to the job's own `model._target_`. `pipeline.load` of a run folder is untrusted
unless the caller says so: it imports the modules the caller names (`imports=`) and, of the
recorded ones, only those this project registers (REGISTERED: its zoo's operators, the
operators of libraries it quantizes with, transformers' output types), and those only
when their package is already imported (pipeline itself) or is found, without running it,
outside the current folder and outside the run folder and the folders above it (where a
module "planted beside" a run would sit). Any other
recorded module, installed or not, is refused with its name: a run folder cannot make a
load import whatever the user happens to have on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import threading
import zipfile
from collections.abc import Iterable
from pathlib import Path

from pipeline import symbolic
from pipeline.errors import ArtifactError, typed_line
from pipeline.layout import ProgramFiles

PROGRAM, IMPORTS = ProgramFiles.program, ProgramFiles.imports
# Operator namespaces torch itself registers: a program calling only these needs no import.
CORE_NAMESPACES = frozenset({"aten", "prims"})
# Namespaces a library registers (not the model's factory): modelopt's quantize ops, traced by
# the export of a module it quantized (pipeline.quantize.torch_modelopt).
LIBRARY_NAMESPACES = {"tensorrt": "modelopt.torch.quantization"}
# Archive folders under data/ that torch.export.load reads without code: tensors and configs.
DATA_FOLDERS = ("data/weights/", "data/constants/", "data/sample_inputs/")
NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd")
# Recorded modules an untrusted load imports unnamed: the zoo's custom operators, the libraries'
# operator namespaces above, transformers' ModelOutput types (shared ones, and a model's own).
REGISTERED = frozenset({"pipeline.zoo", "transformers.modeling_outputs", *LIBRARY_NAMESPACES.values()})
REGISTERED_PATTERNS = (re.compile(r"transformers\.models\.[a-z0-9_]+\.modeling_[a-z0-9_]+"),)
_GUARD = threading.Lock()  # the unpickling guard patches module attributes: one load at a time


class Refused(Exception):
    """Raised inside torch's loader when it tries to unpickle (not a RuntimeError, which it retries)."""


def save(program, folder: Path, imports: Iterable[str]) -> None:
    import torch

    torch.export.save(program, folder / PROGRAM)
    (folder / IMPORTS).write_text(json.dumps(sorted(set(imports))) + "\n")


def needed_imports(program, factory_module: str) -> list[str]:
    """What a fresh process imports before deserialising `program`.

    The factory's module when the program calls operators torch does not define (it registers
    them), or the library's module for a namespace a library registers (LIBRARY_NAMESPACES);
    the modules of every non-builtin pytree type of the program's inputs and outputs
    (transformers.modeling_outputs for a ModelOutput).
    """
    needed = type_modules(program)
    for namespace in custom_namespaces(program):
        needed.add(LIBRARY_NAMESPACES.get(namespace, factory_module))
    return sorted(needed)


def type_modules(program) -> set[str]:
    """Modules defining the container types of the program's inputs and outputs (pytree nodes)."""
    specs = [spec for entry in program.module_call_graph if entry.signature is not None
             for spec in (entry.signature.in_spec, entry.signature.out_spec)]
    found: set[str] = set()
    while specs:
        spec = specs.pop()
        kind = getattr(spec, "type", None)
        if kind is not None and kind.__module__ not in ("builtins", "collections"):
            found.add(kind.__module__)
        specs.extend(spec.children() if hasattr(spec, "children") else [])
    return found


def custom_namespaces(program) -> set[str]:
    """Namespaces of the operators the program calls that torch does not register itself."""
    import torch

    found = set()
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            found |= {n.target.namespace for n in module.graph.nodes
                      if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace not in CORE_NAMESPACES}
    return found


def imports_of(folder: Path) -> list[str]:
    return json.loads((folder / IMPORTS).read_text())


def load(folder: Path, imports: Iterable[str] = (), trusted: bool = True):
    """The program in `folder`, after importing what it needs (see the module docstring for which)."""
    try:
        for module in modules_to_import(folder, list(imports), trusted):
            importlib.import_module(module)
        return load_program(folder / PROGRAM)
    except FileNotFoundError as err:
        raise ArtifactError(f"{err.filename} is missing.", "run the pipeline again to rebuild it.") from None
    except ImportError as err:
        raise ArtifactError(
            f"{folder / PROGRAM} needs module {err.name!r}, which cannot be imported here.",
            "install the package that defines the model's custom operators or output types.",
        ) from None


def modules_to_import(folder: Path, named: list[str], trusted: bool) -> list[str]:
    """The caller's modules, then the recorded ones; refuses a recorded module the rule does not allow."""
    recorded = json.loads((folder / IMPORTS).read_text())
    if not isinstance(recorded, list) or not all(isinstance(m, str) for m in recorded):
        raise ArtifactError(f"{folder / IMPORTS} is not a list of module names.", "rebuild the run.")
    for module in recorded:
        why = not_plain(module) or (None if trusted or module in named else refusal(module, folder.parent))
        if why:
            raise ArtifactError(
                f"{folder / IMPORTS} asks to import module {module!r}, which is not imported: {why}.",
                f"if you trust that code, name it: pipeline.load(run_dir, imports=[{module!r}]) "
                "(or trusted=True); else delete the run folder.")
    return [*named, *recorded]


def not_plain(module: str) -> str | None:
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts) or "__main__" in parts:
        return "it is not a plain module name (or it is a __main__ module, which runs a program)"
    return None


def registered(module: str) -> bool:
    return module in REGISTERED or any(p.fullmatch(module) for p in REGISTERED_PATTERNS)


def refusal(module: str, run_dir: Path) -> str | None:
    """Why a recorded module may not be imported unnamed, or None (see the module docstring)."""
    if not registered(module):
        return ("the caller did not name it (imports=) and it is not a module this project registers "
                "for an operator or output type it knows")
    top = module.split(".")[0]
    run_dir = run_dir.resolve()
    if top in sys.modules:  # already running (pipeline itself): its own submodules are files of its own folder
        where = [Path(p) for p in getattr(sys.modules[top], "__path__", [])]
        inside = next((p for p in where if p.resolve().is_relative_to(run_dir)), None)
        return f"its package lives in the run folder ({inside})" if inside else None
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: finds it, runs none of it
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None  # the import fails with "cannot be imported here"
    folders = [Path(p).parent for p in spec.submodule_search_locations or []]
    if not folders and spec.origin and spec.has_location:
        folders = [Path(spec.origin).parent]
    for folder in (f.resolve() for f in folders):
        why = untrusted_place(folder, run_dir)
        if why:
            return f"{top} would be imported from {folder}, {why}"
    return None


def untrusted_place(folder: Path, run_dir: Path) -> str | None:
    if folder == Path.cwd().resolve():
        return "the current folder"
    if folder.is_relative_to(run_dir):
        return "inside the run folder"
    if run_dir.is_relative_to(folder):
        return "a folder that holds the run folder"
    return None


def load_program(path: Path):
    """torch.export.load of a checked archive, with every unpickler refusing while it runs."""
    import torch

    check_archive(path)
    try:
        with no_unpickling(path):
            return torch.export.load(path)
    except Refused as err:
        raise ArtifactError(f"{path} cannot be loaded without unpickling: {err}.",
                            "rebuild the run with this pipeline; never load programs from unknown sources.") from None
    except (RuntimeError, ValueError, KeyError, OSError, NotImplementedError) as err:
        raise ArtifactError(
            f"{path} cannot be loaded ({typed_line(err)}).",
            "run the pipeline again to rebuild it; programs from another torch version must be re-exported.",
        ) from None


def check_archive(path: Path) -> None:
    """Refuse, before torch reads it, an archive that would unpickle, load compiled code or evaluate
    an expression string (pipeline.symbolic)."""
    try:
        with zipfile.ZipFile(path) as archive:
            reason = pickled_entry(archive) or symbolic.archive_refusal(archive)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, AttributeError, OSError) as err:
        reason = f"it is not a readable torch.export archive ({type(err).__name__}: {err})"
    if reason:
        raise ArtifactError(f"{path} is refused: {reason}; loading it would run code its author chose.",
                            "rebuild the run with this pipeline (python -m pipeline ...) from its config.")


def pickled_entry(archive: zipfile.ZipFile) -> str | None:
    """What in the archive would be unpickled or executed, or None."""
    # Entry names below the archive's own root folder, mapped to the names the zip holds.
    names = {full.split("/", 1)[1]: full for full in archive.namelist() if "/" in full}
    if "archive_version" not in names:
        return "it is not in the .pt2 archive format (older formats are pickles)"
    for name, full in names.items():
        base = os.path.basename(name)
        if name.endswith(NATIVE_SUFFIXES) or (name.startswith("data/") and not name.startswith(DATA_FOLDERS)):
            return f"it holds compiled code or an unknown payload ({name})"
        if name.startswith(DATA_FOLDERS[:2]) and (base.endswith(".pt") or base.startswith(("custom_obj", "opaque"))):
            return f"it holds a pickled payload ({name})"
        if name.startswith(DATA_FOLDERS[:2]) and base.endswith(".json"):
            config = json.loads(archive.read(full)).get("config") or {}
            pickled = [fqn for fqn, meta in config.items() if not isinstance(meta, dict) or meta.get("use_pickle")]
            if pickled:
                return f"{name} marks {', '.join(pickled)} as pickled (use_pickle)"
    return None


@contextlib.contextmanager
def no_unpickling(path: Path):
    """While torch reads `path`: torch.load only weights_only=True, pickle and script-object loads refuse."""
    import pickle

    import torch

    real_load = torch.load

    def weights_only_load(f, *args, weights_only=None, **kwargs):
        if weights_only is False:
            raise Refused("a payload asks torch.load for weights_only=False")
        return real_load(f, *args, weights_only=True, **kwargs)

    def refuse(*args, **kwargs):
        raise Refused("a payload asks for pickle or a script object")

    patches = [(torch, "load", weights_only_load), (torch.serialization, "load", weights_only_load),
               (pickle, "loads", refuse), (pickle, "load", refuse), (torch._C, "_pickle_load_obj", refuse)]
    with _GUARD:
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        try:
            for owner, name, value in patches:
                setattr(owner, name, value)
            yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)


def without_input_checks(gm):
    """An exported program's module without its per-call check of input shapes against the export's ranges.

    The check is a Python pre-hook (tens of microseconds a call, the whole budget of a small
    model on a GPU); the engines check their inputs themselves (ONNX Runtime and TensorRT
    refuse shapes outside their profiles, torch.compile guards and recompiles), and validate
    runs every shape the spec allows before anything is reported.
    """
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
    return gm
