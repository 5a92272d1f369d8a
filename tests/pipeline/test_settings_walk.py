"""Every field of every target's Settings, given a value of the wrong type or out of what it allows.

The in-process part composes the real config with each wrong value and runs what the
job runs before any stage (Hydra's composition and the entry point's one-line report,
then pipeline.checks.check_target); a few real `python -m pipeline` jobs show the
same as the user sees it: one `error:` line, exit 2, no stage started.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from testkit import REPO, clean_env, compose, overrides

from pipeline import targets

# Free-form text (a path, a name) has no wrong value of its type.
FREE_TEXT = (str, str | None)


def wrong_value(f: dataclasses.Field, hints: dict[str, typing.Any]) -> str | None:
    """An override value the field must refuse, or None when every value of its type is allowed."""
    meta = f.metadata
    if "choices" in meta:
        return "not_a_choice"
    if meta.get("low") is not None:
        return str(meta["low"] - 1)
    if meta.get("high") is not None:
        return str(meta["high"] + 1)
    kind = hints[f.name]
    if kind in FREE_TEXT or f.name == "name":
        return None
    if kind in (bool, bool | None):
        return "maybe"
    if kind in (int, float, int | None, float | None):
        return "abc"
    return "not_a_list"  # list[str]


def cases():
    for name, cls in targets.registry().items():
        hints = typing.get_type_hints(cls.Settings)
        for f in dataclasses.fields(cls.Settings):
            value = wrong_value(f, hints)
            if value is not None:
                yield name, f.name, value


CASES = list(cases())


def refusal(tmp: Path, target: str, key: str, value: str) -> str | None:
    """The one line the job prints before any stage for target.key=value (None: it was accepted)."""
    from pipeline.__main__ import request_error
    from pipeline.checks import check_target
    from pipeline.errors import PipelineError
    from pipeline.runner import Runner

    try:
        cfg = compose(tmp, f"target={target}", f"target.{key}={value}")
    except Exception as err:  # Hydra refuses the type: the entry point reports it in one line
        line = request_error(err)
        assert line is not None, f"Hydra's error for target.{key}={value} is not reported in one line: {err}"
        return line
    from rich.console import Console

    try:
        runner = Runner(cfg, tmp / "run", Console(record=True))
        check_target(runner.config)
    except PipelineError as err:
        return err.one_line()
    return None


def test_every_target_setting_declares_or_has_a_type_to_refuse():
    assert len(CASES) >= 25, CASES  # the walk reaches every target's fields, not a few
    assert {c[0] for c in CASES} >= {"onnxruntime", "inductor", "eager", "tensorrt", "torch_tensorrt"}


@pytest.mark.parametrize(("target", "key", "value"), CASES, ids=[f"{t}.{k}" for t, k, _ in CASES])
def test_a_wrong_value_is_one_line_before_any_stage(tmp_path, target, key, value):
    line = refusal(tmp_path, target, key, value)
    assert line is not None, f"target={target} target.{key}={value} was accepted"
    assert "\n" not in line and key in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing ran


@pytest.mark.parametrize("override", ["target.graph_optimization_level=foo", "target.opset=5"])
def test_a_job_refuses_it_in_one_line_with_exit_2(tmp_path, override):
    cmd = [sys.executable, "-m", "pipeline", *overrides(tmp_path, ("target=onnxruntime", override), tmp_path / "cache"),
           f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("error:")]
    assert override.split("=")[0] in line and "Traceback" not in out
    assert "done export" not in out and not (tmp_path / "cache").exists()
