"""A calculator tool environment, the shipped example of :mod:`align.envs`.

The model calls the tool by writing ``<calc>EXPR</calc>``; its turn ends there (``stop``), the environment evaluates
EXPR and answers ``<result>VALUE</result>`` (or ``<error>why</error>``), and the model continues. A turn without a
tool call is the model's answer and ends the episode. Per-turn rewards: ``call_reward`` for a call that evaluates,
``error_reward`` for one that does not (malformed, refused, unclosed); the answer itself is scored by the recipe's
rewards.

EXPR is evaluated from its syntax tree, never with ``eval``: integers and decimals, ``+ - * / **``, unary signs
and parentheses, nothing else (no names, calls, attributes, subscripts, comparisons, strings). Sizes are bounded
before they are computed: at most ``max_chars`` characters, every number (operands, intermediate values, result)
at most ``max_abs`` in magnitude, and a power's result is estimated from logarithms first, so ``9**9**9`` is
refused instantly instead of computed.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from align.envs.protocol import StepResult, environment

Number = int | float
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """An expression the calculator refuses; the message is what the model is shown."""


def evaluate(expression: str, *, max_abs: float = 1e12, max_chars: int = 200) -> Number:
    """The value of an arithmetic expression, from its syntax tree (no ``eval``). Raises :class:`CalculatorError`."""
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > max_chars:
        raise CalculatorError(f"expression longer than {max_chars} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("not an arithmetic expression") from None
    return _value(tree.body, max_abs)


def _value(node: ast.AST, max_abs: float) -> Number:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, complex or str
        number: Number = node.value  # type: ignore[assignment]
        return _bounded(number, max_abs)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand, max_abs))  # type: ignore[no-any-return]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, max_abs), _value(node.right, max_abs)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        if isinstance(node.op, ast.Pow):
            _check_power(left, right, max_abs)
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise CalculatorError("the result is not a real number")
        return _bounded(result, max_abs)
    raise CalculatorError("only numbers, + - * / ** and parentheses are allowed")


def _check_power(base: Number, exponent: Number, max_abs: float) -> None:
    """Refuse a power whose result would exceed ``max_abs`` (or be undefined) before computing it."""
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    if base < 0 and not float(exponent).is_integer():
        raise CalculatorError("the result is not a real number")
    if abs(base) in (0, 1):
        return
    magnitude = float(exponent) * math.log10(abs(base))  # log10 of |result|
    if magnitude > math.log10(max_abs):
        raise CalculatorError("the result is too large")


def _bounded(value: Number, max_abs: float) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large")
    if abs(value) > max_abs:
        raise CalculatorError("the result is too large")
    return value


def format_number(value: Number) -> str:
    """Integers (and floats with an integral value) without a decimal point; other floats to 12 significant
    digits: ``12``, ``0.5``, ``0.333333333333``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"


@environment("calculator")
class Calculator:
    """The model writes ``<calc>EXPR</calc>`` (``open_tag`` / ``close_tag``) and is shown ``<result>VALUE</result>``
    (``result_template``) or ``<error>why</error>`` (``error_template``); a turn without a call ends the episode.

    Rewards per turn: ``call_reward`` (default 0) for a call that evaluates, ``error_reward`` (default -0.1) for one
    that does not, including an opening tag never closed; 0 for the answer turn (the recipe's rewards score it)."""

    def __init__(self, *, open_tag: str = "<calc>", close_tag: str = "</calc>",
                 result_template: str = "<result>{}</result>", error_template: str = "<error>{}</error>",
                 call_reward: float = 0.0, error_reward: float = -0.1, max_abs: float = 1e12,
                 max_chars: int = 200) -> None:
        if not open_tag or not close_tag:
            raise ValueError("open_tag and close_tag must be non-empty strings")
        for key, template in (("result_template", result_template), ("error_template", error_template)):
            if template.count("{}") != 1:
                raise ValueError(f"{key} must hold one {{}} where the value goes, got {template!r}")
            try:
                template.format("0")
            except (IndexError, KeyError, ValueError) as err:  # another field ({unit}) or a stray brace
                raise ValueError(f"{key} must hold only the {{}} where the value goes (write other braces as "
                                 f"{{{{ and }}}}), got {template!r} ({type(err).__name__}: {err})") from None
        if not max_abs > 0 or max_chars < 1:
            raise ValueError(f"max_abs must be > 0 and max_chars >= 1, got {max_abs} and {max_chars}")
        self.open_tag, self.close_tag = open_tag, close_tag
        self.result_template, self.error_template = result_template, error_template
        self.call_reward, self.error_reward = call_reward, error_reward
        self.max_abs, self.max_chars = max_abs, max_chars
        self.stop = (close_tag,)  # the model's turn ends where its call does

    def reset(self, prompt: str, columns: Mapping[str, Any]) -> None:
        return None  # stateless: every call stands alone

    def step(self, action: str) -> StepResult:
        start = action.find(self.open_tag)
        if start < 0:
            return StepResult(observation="", reward=0.0, done=True)  # no call: this turn is the answer
        end = action.find(self.close_tag, start + len(self.open_tag))
        if end < 0:  # the turn ended (EOS or its token budget) inside a call
            return StepResult(observation="", reward=self.error_reward, done=True)
        try:
            value = evaluate(action[start + len(self.open_tag) : end], max_abs=self.max_abs, max_chars=self.max_chars)
        except CalculatorError as err:
            return StepResult(observation=self.error_template.format(err), reward=self.error_reward)
        return StepResult(observation=self.result_template.format(format_number(value)), reward=self.call_reward)
