"""The six stages, in the order data flows through them.

Each module declares one `SPEC` (pipeline.stage.StageSpec): its name, version, inputs,
the config keys it reads, the files of its inputs it reads, what it asks of the target,
the files it writes and whether its output is reused, plus its run function. No stage
imports another: what several stages share lives in pipeline/.
"""

from pipeline.layout import STAGES
from stages import build, convert, export, lower, partition, validate

ORDER = (export.SPEC, lower.SPEC, partition.SPEC, convert.SPEC, build.SPEC, validate.SPEC)
BY_NAME = {spec.name: spec for spec in ORDER}
assert tuple(BY_NAME) == STAGES, "stages.ORDER and pipeline.layout.STAGES disagree"
