"""Saving and loading exported programs with the modules their custom ops need.

A program that uses a custom operator can only be deserialised once the module that
registers the operator is imported; the export stage records those modules next to the
program so any later stage, or `pipeline.load` in a fresh process, can import them first.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from pipeline.errors import ArtifactError
from pipeline.layout import ProgramFiles

PROGRAM, IMPORTS = ProgramFiles.program, ProgramFiles.imports


def save(program, folder: Path, imports: list[str]) -> None:
    import torch

    torch.export.save(program, folder / PROGRAM)
    (folder / IMPORTS).write_text(json.dumps(sorted(set(imports))) + "\n")


def load(folder: Path):
    import torch

    try:
        for module in json.loads((folder / IMPORTS).read_text()):
            importlib.import_module(module)
        return torch.export.load(folder / PROGRAM)
    except FileNotFoundError as err:
        raise ArtifactError(f"{err.filename} is missing.", "run the pipeline again to rebuild it.") from None
    except ImportError as err:
        raise ArtifactError(
            f"{folder / PROGRAM} needs module {err.name!r}, which cannot be imported here.",
            "install the package that defines the model's custom operators.",
        ) from None
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise ArtifactError(
            f"{folder / PROGRAM} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).",
            "run the pipeline again to rebuild it; programs from another torch version must be re-exported.",
        ) from None


def imports_of(folder: Path) -> list[str]:
    return json.loads((folder / IMPORTS).read_text())
