"""The six stages, in the order data flows through them.

Each module declares NAME, VERSION (bump it when its output changes), INPUTS (upstream
stages whose folders it reads), READS (config keys it depends on) and run(ctx) -> metrics.
"""

from stages import build, convert, export, lower, partition, validate

ORDER = (export, lower, partition, convert, build, validate)
