"""The stage contract: what a stage declares (StageSpec) and what the runner hands it (StageContext).

A stage is data plus one function. Its spec says everything the runner and the cache
need to know without looking inside: the upstream stages it reads, the config keys it
depends on (it sees only those: reading any other raises, so its cache key can never
miss a setting), which files of an upstream folder it reads when it reads only a few
(then it is keyed by their content, not by the upstream key), what it asks of the
target (the target's own key material for this stage), the libraries whose versions
change its output, the files it writes, and whether its output may be reused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

Metrics = dict[str, Any]

# What builds the model and its sample inputs (model.name, model.task and input.name are labels).
MODEL_KEYS = ("model._target_", "model.kwargs", "model.weights", "model.weights_sha256", "model.seed")
INPUT_KEYS = ("input.tensors", "input.dims", "input.extra_profiles", "input.seed")


@dataclass
class StageContext:
    config: Any  # a read-only DictConfig holding only the keys the spec reads
    target: Any  # pipeline.targets.Target
    inputs: dict[str, Path]
    out: Path
    console: Console
    # Warnings the stage wants in its manifest and the run summary.
    notes: list[str] = field(default_factory=list)
    # What the runner resolved once for the job (pipeline.worker.Request.resolved).
    resolved: dict[str, Any] = field(default_factory=dict)

    @property
    def quantization(self) -> str | None:
        """Where this job quantizes ("module", "segments" or None), as the runner resolved it; asked
        of the target only for a context made by hand (a test running one stage)."""
        if "quantization" in self.resolved:
            return self.resolved["quantization"]
        return self.target.quantization_route(self.config.compile.precision)

    def warn(self, message: str) -> None:
        self.notes.append(message)
        self.console.print(f"[yellow]warning:[/] {escape(message)}")


@dataclass(frozen=True)
class StageSpec:
    name: str
    # Bump when the stage's output changes for the same inputs: old entries become misses.
    version: int
    run: Callable[[StageContext], Metrics]
    # Upstream stages whose folders it reads.
    inputs: tuple[str, ...] = ()
    # Dotted config keys it reads (and is keyed by).
    reads: tuple[str, ...] = ()
    # Config keys it may show in messages but that change none of its files (model.name): not keyed.
    labels: tuple[str, ...] = ()
    # (key, value) -> more keys it reads only when that setting has that value (int8 builds read the
    # calibration settings; fp32 builds must not rebuild when those change).
    reads_when: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # upstream stage -> the only files of it read: keyed by their sha256, not the upstream key,
    # so sweeps whose settings give the same partition recipe share convert and build.
    content: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # What it asks of the target: the aspect passed to Target.key_material (None: nothing).
    asks: str | None = None
    # Libraries the stage itself uses; the target adds its own for the aspect it is asked.
    libraries: tuple[str, ...] = ("torch",)
    # The fixed files it writes (a pipeline.layout dataclass); per-segment files come on top.
    writes: Any = None
    # False: never reused. A config key: reused only when that setting is true (validate.cache).
    cacheable: bool | str = True

    def reads_for(self, config: dict[str, Any], target=None) -> tuple[str, ...]:
        """The keys this job's config makes it read: `reads`, plus those of every `reads_when` that
        holds, plus what the target makes the stage read (Target.stage_reads for the aspect it asks)."""
        extra = tuple(k for (key, value), keys in self.reads_when.items()
                      if str(lookup(config, key)) == value for k in keys)
        if target is not None and self.asks:
            extra += tuple(target.stage_reads(self.asks, config))
        return self.reads + tuple(dict.fromkeys(k for k in extra if k not in self.reads))

    def written_files(self) -> tuple[str, ...]:
        if self.writes is None:
            return ()
        return tuple(getattr(self.writes, f) for f in self.writes.__dataclass_fields__)

    def is_cached(self, config: dict[str, Any]) -> bool:
        if isinstance(self.cacheable, bool):
            return self.cacheable
        return bool(lookup(config, self.cacheable))


def lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value
