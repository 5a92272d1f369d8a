"""Third-party warnings said once per kind while a stage runs, with the count of those left out."""

from __future__ import annotations

import io
import logging

from pipeline.logs import collapse_repeats


def test_repeated_warnings_print_once_with_a_count_and_the_handlers_come_back():
    root = logging.getLogger()
    before = list(root.handlers)
    out = io.StringIO()
    with collapse_repeats(out):
        quantizer = logging.getLogger("onnxruntime.quantization")
        for i in range(115):
            quantizer.warning(f"Axis 1 is out-of-range for weight layer{i}.conv with rank 1")
        logging.warning("Axis %d is out-of-range for weight %s", 0, "fc")  # root logger: another kind
        logging.basicConfig()  # what libraries do: must not add a second handler that repeats everything
        quantizer.warning("Please consider to run pre-processing before quantization.")
        quantizer.info("not a warning: never printed")
    lines = out.getvalue().splitlines()
    assert lines == [
        "warning: onnxruntime.quantization: Axis 1 is out-of-range for weight layer0.conv with rank 1",
        "warning: root: Axis 0 is out-of-range for weight fc",
        "warning: onnxruntime.quantization: Please consider to run pre-processing before quantization.",
        "warning: 114 more like 'Axis 1 is out-of-range for weight layer0.conv with rank 1' "
        "(onnxruntime.quantization) left out",
    ]
    assert root.handlers == before
