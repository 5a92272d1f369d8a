"""The reference target: every op stays in PyTorch, nothing is converted or built."""

from __future__ import annotations

from pipeline.targets import Target


class EagerTarget(Target):
    name = "eager"

    def unsupported_reason(self, node) -> str:
        return "the eager target runs everything in PyTorch"
