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


# --- layers: the import graph, the quantization tools, the quantization protocol ------------

def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions alike.

    `from pipeline import targets` is an edge to pipeline.targets, `from pipeline.dtypes import x`
    to pipeline.dtypes: each import names the most specific module of the tree it reaches.
    """
    modules = {module_name(p): p for p in paths}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
        graph[name] = {m for m in found if m and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_check_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    graph = import_graph(CODE)
    assert "pipeline.quantize" in graph["pipeline.targets.tensorrt"]  # `from pipeline.quantize import x`
    assert "pipeline.accuracy" in graph["pipeline.quantized_build"]


def test_no_import_cycles():
    """Not even through imports inside functions: a lazy import hides a cycle, it does not remove it."""
    assert cycles(import_graph(CODE)) == []


QUANTIZE_TOOLS = sorted((REPO / "pipeline" / "quantize").glob("*.py"))


@pytest.mark.parametrize("path", QUANTIZE_TOOLS, ids=rel)
def test_quantization_tools_import_no_target(path):
    """The tools transform graphs below the targets: the targets call them, never the reverse."""
    upward = sorted(m for m in imported_modules(path)
                    if m.split(".")[:2] in (["pipeline", "targets"], ["pipeline", "hybrid"])
                    or m in ("pipeline.targets", "pipeline.hybrid"))
    assert upward == [], f"{rel(path)} imports {', '.join(upward)}"


# Names of the quantization half of the Target protocol, old and new: read as attributes, never by name.
CAPABILITIES = {"quantizer", "quantizers", "fp8_quantizer", "dynamic_quantizer", "no_quantizer", "no_int8",
                "no_fp8", "int8_refusal", "fp8_refusal", "quantizer_refusal", "quantizes_module", "layer_names",
                "quantization_route", "quantize_module"}


def capability_lookups(source: str) -> list[int]:
    """Lines of getattr/hasattr calls that name a quantization capability, build one in an f-string,
    or take the name from a variable in a module with a table of capability names (a module-level
    dict, tuple, list or set spelling one)."""
    tree = ast.parse(source)
    tables = [node.value for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
              and isinstance(node.value, (ast.Dict, ast.Tuple, ast.List, ast.Set))]
    spelled = any(isinstance(c, ast.Constant) and c.value in CAPABILITIES for t in tables for c in ast.walk(t))
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2):
            continue
        name = node.args[1]
        if isinstance(name, ast.Constant) and name.value in CAPABILITIES:
            lines.append(node.lineno)
        elif isinstance(name, ast.JoinedStr):
            text = "".join(v.value for v in name.values if isinstance(v, ast.Constant))
            if any(word in text for word in ("refusal", "quantiz", "no_")):
                lines.append(node.lineno)
        elif not isinstance(name, ast.Constant) and spelled:
            lines.append(node.lineno)
    return lines


def test_the_capability_check_catches_getattr_lookups():
    source = ('q = getattr(cls, "quantizer", None)\nr = getattr(cls, f"{precision}_refusal", None)\n'
              'ok = hasattr(target, "layer_names")\nx = getattr(torch, "float16")\n')
    assert capability_lookups(source) == [1, 2, 3]
    table = 'ATTRIBUTES = {"int8": ("quantizer", "no_int8")}\nq = getattr(cls, ATTRIBUTES[p][0], None)\n'
    assert capability_lookups(table) == [2]


@pytest.mark.parametrize("path", CODE, ids=rel)
def test_quantization_capabilities_are_declared_not_looked_up(path):
    """Target declares them with defaults (quantizers, quantizer_refusal, ...): code reads them directly."""
    assert capability_lookups(path.read_text()) == [], f"{rel(path)} looks a quantization capability up by name"


def test_the_jobs_process_imports_no_torch():
    """The job's process reads the stages' specs and checks the job; the stage worker, whose server
    imported torch, runs them. torch imported in the job's process too costs every job seconds of
    CPU (issue 20: the orchestrator's share of a cold run), so a module-level `import torch`
    (or of pipeline.hybrid) in a stage, or a check that needs torch, fails here."""
    import subprocess
    import sys

    code = ("import sys\nfrom omegaconf import OmegaConf\n"
            "import pipeline.__main__, pipeline.cli, pipeline.runner, pipeline.sweep, pipeline.tracking, stages\n"
            "from pipeline import shapes\n"
            "shapes.check(OmegaConf.create({'tensors': [{'name': 'x', 'shape': [1, 3, 8, 8], 'dtype': 'fp16',\n"
            "    'low': 0, 'high': 1}, {'name': 'ids', 'shape': [1, 4], 'dtype': 'int64', 'low': 0, 'high': 9}],\n"
            "    'dims': {}, 'extra_profiles': []}))\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m == 'pipeline.hybrid'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the job's process imported {out.stdout.strip()}"
