"""Imported by the stage worker's server in a sweep of ONNX-based jobs (Target.sweep_preload).

Building torch.onnx's op registry imports onnx and onnxscript and parses every torchlib
function: seconds of CPU. Each job of a sweep runs its stages in a worker forked from one
server, so the registry built here once is inherited by every job's partition and lower.
"""

from pipeline.targets.onnx_base import registry

registry()
