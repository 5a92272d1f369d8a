"""Where things are on disk: the stage names, in order, and the file names each stage writes.

This is the only place those names are spelled. A stage's spec (stages/) points at its
files here; the runner, the cache, the hybrid loader, compare and the tests read them
from here, so renaming a file is a one-line change.
"""

from __future__ import annotations

from dataclasses import dataclass

# The stages in the order data flows through them (stages.ORDER holds their specs).
STAGES = ("export", "lower", "partition", "convert", "build", "validate")
# The stages a compiled module is rebuilt from (pipeline.load).
LOAD_STAGES = ("export", "lower", "partition", "build")

MANIFEST = "manifest.json"
# Files of a run folder itself.
RUN_JSON = "run.json"
RUN_CONFIG = "config.yaml"
CONSOLE_LOG = "console.log"


@dataclass(frozen=True)
class ProgramFiles:
    """An exported program and the modules it needs imported first (export and lower)."""

    program: str = "program.pt2"
    imports: str = "imports.json"


@dataclass(frozen=True)
class ExportFiles(ProgramFiles):
    example: str = "example_inputs.pt"
    model: str = "model.json"


@dataclass(frozen=True)
class LowerFiles(ProgramFiles):
    ops: str = "ops.json"


@dataclass(frozen=True)
class PartitionFiles:
    report: str = "report.json"
    recipe: str = "recipe.json"


@dataclass(frozen=True)
class ConvertFiles:
    segments: str = "segments.json"


@dataclass(frozen=True)
class BuildFiles:
    engines: str = "engines.json"


@dataclass(frozen=True)
class ValidateFiles:
    report: str = "report.json"


EXPORT, LOWER, PARTITION = ExportFiles(), LowerFiles(), PartitionFiles()
CONVERT, BUILD, VALIDATE = ConvertFiles(), BuildFiles(), ValidateFiles()
