"""Verifiers for the synthetic tasks of :mod:`align.data.tasks` that exact match cannot check."""

from __future__ import annotations

import ast
from collections import Counter

from rewards.registry import reward

_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.USub)


def safe_arithmetic(expression: str) -> tuple[int, list[int]]:
    """Value of an expression over integers with + - * and parentheses, and the integers it uses; raises
    ValueError for anything else (names, calls, division, powers)."""
    tree = ast.parse(expression.strip(), mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED) or (isinstance(node, ast.Constant) and type(node.value) is not int):
            raise ValueError(f"not a + - * expression over integers: {expression!r}")
    numbers = [int(n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is int]
    value = eval(compile(tree, "<countdown>", "eval"), {"__builtins__": {}})
    return int(value), numbers


@reward("countdown")
def countdown(completion: str, prompt: str) -> float:
    """1.0 if the completion is an expression that uses the prompt's numbers (each at most once) and equals its
    target (prompt ``"3,5,7->22="``), else 0.0. Malformed completions score 0, not an error."""
    numbers_text, target_text = prompt.rstrip("=").split("->")
    available = Counter(int(n) for n in numbers_text.split(","))
    try:
        value, used = safe_arithmetic(completion)
    except (ValueError, SyntaxError):
        return 0.0
    return float(value == int(target_text) and not Counter(used) - available)
