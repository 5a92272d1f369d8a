"""The shape of the code, checked: module and function sizes, stage independence, no name checks.

These hold the architecture issue's rules in place: a stage is one small module that
imports no other stage; generic modules (runner, cache, hybrid, stages) ask a target
through its protocol instead of comparing its name; and no module or function grows
past what a reader takes in at one sitting.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from testkit import REPO

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
CODE = sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").glob("*.py")])
GENERIC = [REPO / "pipeline" / "runner.py", REPO / "pipeline" / "hybrid.py", *(REPO / "pipeline" / "cache").glob("*.py"),
           *(REPO / "stages").glob("*.py")]
TARGET_NAMES = {"onnxruntime", "tensorrt", "tensorrt_rtx", "torch_tensorrt", "inductor", "eager"}


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_checks_see_the_code():
    assert len(CODE) > 25 and all(p.is_file() for p in GENERIC)


@pytest.mark.parametrize("path", CODE, ids=rel)
def test_module_and_function_sizes(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{rel(path)} is over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{rel(path)}:{node.lineno} {node.name} has {length} lines"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("path", sorted((REPO / "stages").glob("*.py")), ids=rel)
def test_no_stage_imports_another(path):
    others = {f"stages.{p.stem}" for p in (REPO / "stages").glob("*.py") if p.stem not in (path.stem, "__init__")}
    if path.stem == "__init__":
        return  # the package lists the stages in order
    assert not imported_modules(path) & (others | {"stages"}), f"{rel(path)} imports another stage"


def test_only_the_runner_and_its_worker_know_the_stages():
    importers = sorted(rel(p) for p in (REPO / "pipeline").rglob("*.py")
                       if any(m == "stages" or m.startswith("stages.") for m in imported_modules(p)))
    assert importers == ["pipeline/runner.py", "pipeline/worker.py"]


def name_comparisons(source: str) -> list[int]:
    """Lines comparing something with a target's name (`target.name != "torch_tensorrt"`, `in (...)`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            constants = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            if constants & TARGET_NAMES:
                lines.append(node.lineno)
    return lines


def test_the_name_check_catches_name_checks():
    assert name_comparisons('x = ctx.target.name != "torch_tensorrt"\nif t in ("onnxruntime", "a"):\n    pass') == [1, 2]
    assert name_comparisons('print(target.name)\nif target.truncates_double:\n    pass') == []


@pytest.mark.parametrize("path", GENERIC, ids=rel)
def test_generic_code_never_compares_a_target_name(path):
    assert name_comparisons(path.read_text()) == [], f"{rel(path)} compares a target's name"


def test_one_registry_derives_the_target_choices():
    """Each target module (one class, one schema) is the registry: conf/target/ has one YAML per target."""
    from pipeline import targets

    names = set(targets.registry())
    assert names == TARGET_NAMES - {"tensorrt_rtx"}
    yamls = {p.stem for p in (REPO / "conf" / "target").glob("*.yaml")}
    assert yamls == names | {"auto"}
    for name, cls in targets.registry().items():
        assert cls.Settings.name == name and cls.__module__ == f"pipeline.targets.{name}"
        assert f"schema_{name}" in (REPO / "conf" / "target" / f"{name}.yaml").read_text()
