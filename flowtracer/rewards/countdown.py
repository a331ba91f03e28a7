"""Countdown: combine the given numbers with + - * / and parentheses to reach the target."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from flowtracer.rewards.base import Score
from flowtracer.rewards.extract import answer_tag

_EXPR_LINE = re.compile(r"^[\d\s+\-*/().]+$")
_MAX_EXPR_CHARS = 512  # a real answer is a few dozen characters; bounds the AST walk
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses.

    Parsed with `ast`, never `eval`: only integer literals, binary + - * /, unary minus and
    parentheses are allowed; anything else (names, calls, **, floats) raises ValueError, as does
    division by zero. Fractions keep ``(1 + 2) / 3 * 3`` exact.
    """
    if len(expr) > _MAX_EXPR_CHARS:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, RecursionError) as exc:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from exc
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ValueError("division by zero")
            return left / right
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"disallowed syntax: {type(node).__name__}")

    return walk(tree.body), used


def _find_expression(response: str) -> tuple[str, tuple[int, int]] | None:
    found = answer_tag(response)
    if found is not None:
        return found
    end = len(response)
    for line in reversed(response.splitlines(keepends=True)):
        start = end - len(line)
        body = line.strip()
        if body and _EXPR_LINE.match(body) and any(c.isdigit() for c in body):
            lead = len(line) - len(line.lstrip())
            return body, (start + lead, start + lead + len(body))
        end = start
    return None


def _reference(reference: Any) -> tuple[int, list[int]]:
    ref = json.loads(reference) if isinstance(reference, str) else reference
    numbers = ref.get("numbers", ref.get("nums"))
    if "target" not in ref or numbers is None:
        raise ValueError(f'countdown reference needs "target" and "numbers", got keys {sorted(ref)}')
    return int(ref["target"]), [int(n) for n in numbers]


class CountdownVerifier:
    """Reward 1.0 when the response's expression uses the given numbers and equals the target.

    reference: ``{"target": int, "numbers": [int, ...]}`` (``"nums"`` also accepted, as in
    TinyZero), or that as a JSON string. The expression is the content of the last
    ``<answer>...</answer>``, else the last line made only of digits, operators, parentheses and
    spaces. An ``=`` inside the answer makes it invalid (write the left side only).

    use_all: True (TinyZero convention) = each given number exactly once; False = at most once.
    format_score: reward for an answer that was found but is wrong or invalid (TinyZero uses 0.1);
        0.0 by default. A response with no answer at all gets 0.0.
    """

    def __init__(self, use_all: bool = True, format_score: float = 0.0):
        self.use_all = use_all
        self.format_score = float(format_score)

    def check_reference(self, reference: Any) -> str | None:
        """Why `reference` is not a countdown puzzle ({"target", "numbers"}), else None."""
        try:
            _reference(reference)
        except (ValueError, TypeError, AttributeError) as exc:  # bad JSON, wrong keys, non-ints
            detail = f" ({exc})" if isinstance(exc, ValueError) and str(exc) else ""  # others are noise
            return f"expected a countdown puzzle: a dict or JSON string with 'target' and 'numbers'{detail}"
        return None

    def __call__(self, response: str, reference: Any) -> Score:
        target, numbers = _reference(reference)
        found = _find_expression(response)
        if found is None:
            return Score(0.0, None, None)
        expr, span = found
        try:
            value, used = evaluate(expr)
        except ValueError:
            return Score(self.format_score, span, expr)
        have, need = Counter(used), Counter(numbers)
        numbers_ok = have == need if self.use_all else not (have - need)
        reward = 1.0 if numbers_ok and value == target else self.format_score
        return Score(reward, span, expr)
