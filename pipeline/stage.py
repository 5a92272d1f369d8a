"""What the runner hands a stage: its own config subset, its target, folders on disk.

A stage sees only the config keys it declares in READS (reading any other raises), so
its cache key can never miss a setting that changes its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console

from pipeline.targets import Target


@dataclass
class StageContext:
    config: DictConfig
    target: Target
    inputs: dict[str, Path]
    out: Path
    console: Console
    # Warnings the stage wants in its manifest and the run summary.
    notes: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.notes.append(message)
        self.console.print(f"[yellow]warning:[/] {message}")


Metrics = dict[str, Any]
