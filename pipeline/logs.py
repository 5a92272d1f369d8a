"""Third-party warnings, each said once: repeats are counted, not printed.

Libraries log one warning per layer or per tensor: ONNX Runtime's quantizer printed
`Axis 1 is out-of-range for weight ...` 115 times for one timm model, burying the lines
that matter. While a stage runs, warnings from other packages go through one handler that
prints the first of each kind and counts the rest; the count is printed when the stage
ends. Our own messages are never collapsed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections import Counter

# Messages of one kind differ in numbers, names and shapes: the first words, numbers masked, tell them apart.
_KIND_WORDS = 5


def kind(record: logging.LogRecord) -> tuple[str, int, str]:
    text = record.msg if isinstance(record.msg, str) and record.args else record.getMessage()
    words = re.sub(r"\d+", "#", str(text)).split()[:_KIND_WORDS]
    return record.name, record.levelno, " ".join(words)


class OncePerKind(logging.Filter):
    """Lets the first record of each kind through and counts the others."""

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()
        self.first: dict[tuple[str, int, str], str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = kind(record)
        self.seen[key] += 1
        if self.seen[key] == 1:
            self.first[key] = record.getMessage()
            return True
        return False

    def repeats(self) -> list[str]:
        return [f"warning: {count - 1} more like {self.first[key][:80]!r} ({key[0]}) left out"
                for key, count in self.seen.items() if count > 1]


@contextlib.contextmanager
def collapse_repeats(stream=None):
    """Route warnings of the root logger through one deduplicating handler for the duration.

    With this handler the root's only one, a library's own logging.basicConfig() adds none,
    so every third-party record passes here.
    """
    stream = stream or sys.stderr
    once = OncePerKind()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(name)s: %(message)s"))
    handler.addFilter(once)
    root = logging.getLogger()
    saved, root.handlers = root.handlers, [handler]  # a handler a library added in an earlier stage would repeat
    try:
        yield once
    finally:
        root.handlers = saved
        for line in once.repeats():
            print(line, file=stream)
