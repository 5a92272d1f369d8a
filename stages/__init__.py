"""The six stages, in the order data flows through them.

Each module declares one `SPEC` (pipeline.stage.StageSpec): its name, version, inputs,
the config keys it reads, the files of its inputs it reads, what it asks of the target,
the files it writes and whether its output is reused, plus its run function. No stage
imports another: what several stages share lives in pipeline/.

Importing a stage module imports no torch (nor pipeline.hybrid, which does): they import it
in the functions that use it. The job's process imports these modules only for their SPECs
while the stage worker runs them, and torch there would cost every job seconds of CPU
(tests/test_architecture.py checks it).
"""

from pipeline.layout import STAGES
from stages import build, convert, export, lower, partition, payoff, validate

ORDER = (export.SPEC, lower.SPEC, partition.SPEC, convert.SPEC, build.SPEC, validate.SPEC)
# Run only for int8/fp8 jobs, after validate (the runner builds its baseline chain first).
PAYOFF = payoff.SPEC
BY_NAME = {spec.name: spec for spec in (*ORDER, PAYOFF)}
assert tuple(spec.name for spec in ORDER) == STAGES, "stages.ORDER and pipeline.layout.STAGES disagree"
