"""The reference target: every op stays in PyTorch, nothing is converted or built."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.schema import choice
from pipeline.targets import DEVICES, Target, TargetSettings


@dataclass
class Settings(TargetSettings):
    """The reference: everything stays in PyTorch."""

    name: str = "eager"
    # auto: CUDA where torch sees a GPU, else the CPU (the baseline runs where the engines would).
    device: str = choice("auto", DEVICES)


class EagerTarget(Target):
    name = "eager"
    Settings = Settings

    def unsupported_reason(self, node) -> str:
        return "the eager target runs everything in PyTorch"


TARGET = EagerTarget
