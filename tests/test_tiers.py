"""The test tiers' table names real tests and is the only place that assigns a tier; no test times the machine.

A stale entry would quietly move a test into the fast tier (or out of it), and a tier mark
written in a test file would be a second place to look. A test that asserts a wall-clock
budget fails on a busy machine while the behaviour is right (issue 27): tests check the
mechanism, timings belong to bench/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from tiers import HERE, TIERS, tiers_of

TEST_FILES = sorted(HERE.rglob("test_*.py"))
HELPERS = sorted(p for p in HERE.rglob("*.py") if not p.name.startswith("test_"))
CLOCKS = {"time", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns"}


def defined_tests(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_every_entry_names_a_test_that_exists(tier):
    for key in TIERS[tier]:
        file, _, function = key.partition("::")
        assert (HERE / file).is_file(), f"{tier}: {key}: no such file under tests/"
        assert not function or function in defined_tests(HERE / file), f"{tier}: {key}: no such test"


def test_a_file_entry_covers_its_tests_and_unnamed_tests_are_fast():
    assert tiers_of(HERE / "pipeline" / "test_sweep.py", "test_anything") == {"integration"}
    assert tiers_of(HERE / "test_gpu.py", "test_anything") == {"gpu"}
    assert tiers_of(HERE / "test_quantization_modelopt.py",
                    "test_export_traces_modelopt_quantize_ops_on_the_gpu") == {"integration", "gpu"}
    assert tiers_of(HERE / "pipeline" / "test_runner.py", "test_job_finishes_on_onnxruntime") == set()


def tier_marks(source: str) -> list[int]:
    """Lines that write `pytest.mark.<tier>` (a decorator or a pytestmark)."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr in TIERS
            and isinstance(node.value, ast.Attribute) and node.value.attr == "mark"]


def test_the_mark_check_catches_marks():
    assert tier_marks("@pytest.mark.slow\ndef test_a():\n    pass\npytestmark = [pytest.mark.gpu]") == [1, 4]
    assert tier_marks("@pytest.mark.parametrize('a', [1])\ndef test_a(a):\n    pass") == []


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.relative_to(HERE).as_posix())
def test_no_test_file_marks_its_own_tier(path):
    assert tier_marks(path.read_text()) == [], f"{path.name}: put its tier in tests/tiers.py"


def _reads_a_clock(node: ast.AST, clock_names: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, (ast.Attribute, ast.Name)):
            if (sub.func.attr if isinstance(sub.func, ast.Attribute) else sub.func.id) in CLOCKS:
                return True
        if isinstance(sub, ast.Name) and sub.id in clock_names:
            return True
    return False


def wall_clock_budgets(source: str) -> list[int]:
    """Lines asserting a clock reading (or a name computed from one) against a fixed number of seconds.

    An order between two readings of clocks (a sample within the time around it) is no budget.
    """
    clock_names: set[str] = set()
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            if _reads_a_clock(node.value, clock_names):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                clock_names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assert):
            continue
        for compare in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
            sides = [compare.left, *compare.comparators]
            numbers = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, (int, float))]
            if numbers and any(_reads_a_clock(s, clock_names) for s in sides):
                lines.append(node.lineno)
    return lines


def test_the_budget_check_catches_budgets():
    # The budgets this file forbids, spelt as source text (built up, so no grep takes them for real ones).
    less, at_most = "<", "<="
    budget = ("started = time.monotonic()\nrun()\nwaited = time.monotonic() - started\n"
              f"assert proc.returncode == 2 and waited {less} 20\nassert time.perf_counter() - t0 {at_most} 5.0")
    assert wall_clock_budgets(budget) == [4, 5]
    orders = ("t0 = time.perf_counter()\ns = measure()\noutside = time.perf_counter() - t0\n"
              "assert s.total <= outside and s.iterations == 3\nassert time.monotonic() < deadline")
    assert wall_clock_budgets(orders) == []


@pytest.mark.parametrize("path", TEST_FILES + HELPERS, ids=lambda p: p.relative_to(HERE).as_posix())
def test_no_test_asserts_a_wall_clock_budget(path):
    assert wall_clock_budgets(path.read_text()) == [], f"{path.name}: check the mechanism, not the time taken"
