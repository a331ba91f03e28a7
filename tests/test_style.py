"""Code-size rules of the project: files readable at once, functions readable at once.

No function in flowtracer/ has more than 60 lines of code (docstrings, comments and blank lines
aside), and train/module.py (the RL step) stays under 400 lines.
"""

from __future__ import annotations

import ast

from conftest import ROOT

MAX_FUNCTION_LINES = 60


def _code_lines(lines: list[str], node: ast.AST) -> int:
    doc = None
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = (body[0].lineno, body[0].end_lineno)
    count = 0
    for i in range(node.lineno, node.end_lineno + 1):
        if doc and doc[0] <= i <= doc[1]:
            continue
        text = lines[i - 1].strip()
        count += bool(text) and not text.startswith("#")
    return count


def test_no_function_is_longer_than_60_lines_of_code():
    long = []
    for path in sorted((ROOT / "flowtracer").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(lines, node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_step_module_stays_small():
    n = len((ROOT / "flowtracer" / "train" / "module.py").read_text().splitlines())
    assert n < 400, f"flowtracer/train/module.py has {n} lines; move Lightning-free pieces to flowtracer/train/step/"
