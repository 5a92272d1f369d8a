"""Symbolic shape expressions of a .pt2 archive, checked by a strict grammar before torch reads them.

torch.export's deserializer hands every `expr_str` of `models/*.json` to `sympy.sympify`,
and sympy's parser evaluates Python: an expression string in a program is code its author
chose. So before torch opens an archive, every expression string is parsed here with
Python's own parser (`ast`, which evaluates nothing) and each node must belong to the
grammar of shape expressions as torch 2.14 writes them:

- its serializer writes `sympy.srepr`: `Symbol('s77', positive=True, integer=True)`,
  `Integer(2)`, `Add(..)`, `Mul(..)`, `FloorDiv(..)`, `Min(..)`, `Eq(..)`, ...;
- range constraints are keyed by `str(expr)`: `s77`, `2*s69`, `Min(s0, 4)`.

So: integers (bounded), symbol names (`s0`, `u3`, `zuf0`: torch's prefixes, then digits),
`+ - * // %`, calls of a fixed set of sympy and torch functions, parentheses. A Symbol takes
one name and boolean assumptions; Pow only a small integer exponent (a huge one would make
sympy compute for ever). Anything else is refused, naming the archive entry and the
expression. Range bounds must be integers (or null: unbounded).
"""

from __future__ import annotations

import ast
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Symbols of exported programs: sizes (s), unbacked ints (u), floats (zf, zuf), precomputed sizes (ps).
SYMBOL = re.compile(r"(s|u|zf|zuf|ps)[0-9]{1,7}")
ASSUMPTION = re.compile(r"[a-z_]{1,24}")
# sympy's classes in srepr, and the integer functions torch's deserializer defines for sympify.
FUNCTIONS = frozenset({
    "Integer", "Add", "Mul", "Pow", "Min", "Max", "Mod", "Abs",
    "Eq", "Ne", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "And", "Or", "Not",
    "FloorDiv", "PythonMod", "CeilDiv", "CleanDiv", "ModularIndexing", "Where", "IntTrueDiv",
    "CeilToInt", "FloorToInt", "TruncToInt", "RoundToInt", "PowByNatural", "Identity",
})
OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
CONSTANT_NAMES = frozenset({"true", "false"})  # srepr of sympy's booleans
MAX_CHARS, MAX_INT, MAX_EXPONENT = 20_000, 2 ** 64, 64
GRAMMAR = ("integers, symbols such as s0, + - * // %, Min/Max/Mod/FloorDiv and the other integer "
           "functions of torch's shape expressions, parentheses")


def is_shape_expression(text: Any) -> bool:
    """True if `text` is a string in the grammar of shape expressions (parsed, never evaluated)."""
    if not isinstance(text, str) or len(text) > MAX_CHARS:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    try:
        return _allowed(tree.body)
    except RecursionError:
        return False


def _allowed(node: ast.AST) -> bool:
    if isinstance(node, (ast.Constant, ast.UnaryOp)):
        return _integer(node) is not None
    if isinstance(node, ast.Name):
        return bool(SYMBOL.fullmatch(node.id)) or node.id in CONSTANT_NAMES
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, OPERATORS) and _allowed(node.left) and _allowed(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return _call_allowed(node.func.id, node.args, node.keywords)
    return False


def _call_allowed(name: str, args: list[ast.expr], keywords: list[ast.keyword]) -> bool:
    if name == "Symbol":
        return (len(args) == 1 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)
                and bool(SYMBOL.fullmatch(args[0].value))
                and all(k.arg is not None and ASSUMPTION.fullmatch(k.arg) and isinstance(k.value, ast.Constant)
                        and type(k.value.value) is bool for k in keywords))
    if name not in FUNCTIONS or keywords or not args:
        return False
    if name == "Integer":
        return len(args) == 1 and _integer(args[0]) is not None
    if name == "Pow":
        exponent = _integer(args[-1]) if len(args) == 2 else None
        if exponent is None and len(args) == 2 and isinstance(args[1], ast.Call) and \
                isinstance(args[1].func, ast.Name) and args[1].func.id == "Integer" and len(args[1].args) == 1:
            exponent = _integer(args[1].args[0])
        return exponent is not None and abs(exponent) <= MAX_EXPONENT and _allowed(args[0])
    return all(_allowed(a) for a in args)


def _integer(node: ast.AST) -> int | None:
    """The value of an integer literal (optionally negated) within bounds, else None."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        sign, node = -1, node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value <= MAX_INT:
        return sign * node.value
    return None


def refused_expressions(model: Any) -> Iterator[str]:
    """Every expression string (or range bound) in a program's JSON that is not in the grammar."""
    stack = [model]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str" and not is_shape_expression(value):
                    yield value if isinstance(value, str) else repr(value)
                elif key == "range_constraints" and isinstance(value, dict):
                    yield from _refused_ranges(value)
                else:
                    stack.append(value)


def _refused_ranges(ranges: dict[str, Any]) -> Iterator[str]:
    for name, bounds in ranges.items():
        if not is_shape_expression(name):
            yield name
        elif not isinstance(bounds, dict) or any(
                bounds.get(b) is not None and type(bounds.get(b)) is not int for b in ("min_val", "max_val")):
            yield f"{name}: {bounds!r}"


def archive_refusal(archive: zipfile.ZipFile) -> str | None:
    """Why the archive's symbolic shapes cannot be read without evaluating code, or None."""
    for full in archive.namelist():
        name = full.split("/", 1)[1] if "/" in full else full
        if not (name.startswith("models/") and name.endswith(".json")):
            continue
        try:
            model = json.loads(archive.read(full))
        except ValueError as err:
            return f"{name} is not JSON ({err})"
        bad = next(refused_expressions(model), None)
        if bad is not None:
            shown = bad if len(bad) <= 300 else bad[:300] + "..."
            return f"{name} holds the shape expression {shown!r}, which is not in the grammar of shape " \
                   f"expressions ({GRAMMAR}); sympy would evaluate it as Python"
    return None


def check_file(path: Path) -> None:
    """Refuse an archive (a .pt2, Torch-TensorRT's .ep) whose shape expressions are not in the grammar."""
    from pipeline.errors import ArtifactError

    try:
        with zipfile.ZipFile(path) as archive:
            reason = archive_refusal(archive)
    except (zipfile.BadZipFile, OSError) as err:
        reason = f"it is not a readable archive ({type(err).__name__})"
    if reason:
        raise ArtifactError(f"{path} is refused: {reason}.",
                            "rebuild the run with this pipeline; never load programs from unknown sources.")
