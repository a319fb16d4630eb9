"""Code execution against tests, in the sandbox (:mod:`rewards.sandbox`), with the verdict made outside it.

The code under test owns its interpreter: anything that runs there can be rebound (``builtins.exec``, the harness's
globals through ``sys._getframe``, ``__eq__`` of the value it returns). So the sandbox never decides whether a test
passed. Each test is split, here in the trainer, into what must run with the code (an expression) and what it must
equal (a Python literal, which never enters the sandbox). The sandbox reports the ``repr`` of each expression's value;
the trainer parses it back with :func:`ast.literal_eval` and compares. To pass a test, the program must produce
the expected value's text without being told it: forging a report is no easier than solving the task.

Tests, as given in the dataset column (a list, or one string of statements):

* ``assert <expr> == <literal>`` (either side literal): the value of ``<expr>`` must equal the literal.
* ``assert <expr>`` / ``assert not <expr>``: ``bool(<expr>)`` must be True / False. Weaker: a program that learns to
  report ``True`` for every bare assert passes them; prefer ``== <literal>`` tests where the answer matters.
* ``{"stdin": "...", "stdout": "..."}``: the program, run as a script with that input, must print that output
  (trailing whitespace of each line and trailing blank lines ignored).

Anything else (a loop, ``assert f(x) == g(y)`` with no literal side) is refused: such a test could only be judged
inside the process that is being judged. A run that dies, times out or trips a sandbox limit is an error (the reward
runner applies the term's failure policy); code that is merely wrong (a syntax error, an exception, a wrong value)
fails the tests it does not pass.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from align.errors import InputError
from rewards.registry import reward
from rewards.sandbox import SandboxLimits, SandboxResult, require_confinement, run_python

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)
_MAX_REPR = 10_000  # characters of a reported value; longer values fail their test

# Runs the solution, then reports the repr of each case's expression (or its truth value) on its own line, tagged
# with a nonce read from stdin. The verdict is made by the trainer; this only reports.
_HARNESS = """
import json, sys
nonce = sys.stdin.readline().strip()
cases = json.load(open("cases.json"))
write, flush = sys.stdout.write, sys.stdout.flush
namespace = {"__name__": "solution"}


def violation(err):
    # what the sandbox stopped, as opposed to code that is merely wrong
    if isinstance(err, (MemoryError, BlockingIOError)):
        return type(err).__name__
    if isinstance(err, PermissionError) and str(err).startswith("sandbox:"):
        return "PermissionError"
    return None


def report(index, text):
    write("\\n" + json.dumps([nonce, index, text]) + "\\n")
    flush()


def attempt(action):
    try:
        return action()
    except BaseException as err:
        kind = violation(err)
        if kind:
            write(f"\\n{nonce} violation {kind}\\n")
            flush()
            raise SystemExit(3)
        return None


loaded = attempt(lambda: exec(compile(open("solution.py").read(), "solution.py", "exec"), namespace) or True)
for index, (expression, truth) in enumerate(cases):
    if not loaded:
        report(index, None)
        continue
    code = compile(expression, f"<test {index}>", "eval")
    value = attempt(lambda: (lambda v: repr(bool(v)) if truth else repr(v))(eval(code, namespace)))
    report(index, value if isinstance(value, str) and len(value) <= MAX_REPR else None)
""".replace("MAX_REPR", str(_MAX_REPR))


class SandboxError(RuntimeError):
    """The sandboxed run did not finish normally (timeout, limit, crash, missing or contradictory report)."""


@dataclass(frozen=True)
class ValueCase:
    """``expression`` evaluated with the solution must equal ``expected`` (its truth value when ``truth``)."""

    expression: str
    expected: Any
    truth: bool = False


@dataclass(frozen=True)
class IOCase:
    """The solution run as a script with ``stdin`` must print ``stdout``."""

    stdin: str
    stdout: str


def extract_code(completion: str) -> str:
    """The last fenced code block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def _literal(node: ast.expr) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def parse_test(test: str | Mapping[str, Any]) -> ValueCase | IOCase:
    """One test as the trainer will judge it; raises InputError (one line) for a test it cannot judge outside."""
    if isinstance(test, Mapping):
        if set(test) != {"stdin", "stdout"} or not all(isinstance(v, str) for v in test.values()):
            raise InputError(f"code_tests: an input/output test needs exactly the string keys stdin and stdout, got "
                             f"{sorted(test)}")
        return IOCase(test["stdin"], test["stdout"])
    if not isinstance(test, str):
        raise InputError(f"code_tests: a test is a string or a {{stdin, stdout}} mapping, got {type(test).__name__}")
    hint = "write it as `assert <expr> == <literal>`, `assert <expr>`, `assert not <expr>` or {stdin, stdout}"
    try:
        module = ast.parse(test.strip())
    except SyntaxError as err:
        raise InputError(f"code_tests: test {test[:60]!r} is not valid Python ({err.msg}); {hint}") from None
    if len(module.body) != 1 or not isinstance(module.body[0], ast.Assert):
        raise InputError(f"code_tests: test {test[:60]!r} is not a single assert; {hint}")
    condition = module.body[0].test
    if isinstance(condition, ast.Compare) and len(condition.ops) == 1 and isinstance(condition.ops[0], ast.Eq):
        left, right = condition.left, condition.comparators[0]
        for expression, other in ((left, right), (right, left)):
            is_literal, value = _literal(other)
            if is_literal:
                return ValueCase(ast.unparse(expression), value)
        raise InputError(f"code_tests: test {test[:60]!r} compares two computed values, which only the process "
                         f"under test could judge; make one side a literal")
    if isinstance(condition, ast.UnaryOp) and isinstance(condition.op, ast.Not):
        return ValueCase(ast.unparse(condition.operand), False, truth=True)
    return ValueCase(ast.unparse(condition), True, truth=True)


def _same_output(actual: str, expected: str) -> bool:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return lines(actual) == lines(expected)


def _check_finished(result: SandboxResult) -> None:
    if result.timed_out:
        raise SandboxError(f"timed out after {result.wall_seconds:.1f}s")


def _value_reports(result: SandboxResult, nonce: str, count: int) -> list[str | None]:
    """The reported text of each case; SandboxError on a violation, a missing report or contradictory reports."""
    reports: dict[int, str | None] = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce and parts[1] == "violation":
            raise SandboxError(f"the sandbox stopped the code ({parts[2]})")
        if not line.startswith('["'):
            continue
        try:
            tag, index, text = json.loads(line)
        except (ValueError, TypeError):
            continue
        if tag != nonce or not isinstance(index, int) or not 0 <= index < count:
            continue
        if index in reports and reports[index] != text:
            raise SandboxError(f"contradictory reports for test {index}: the code tampered with the harness")
        reports[index] = text if isinstance(text, str) else None
    if len(reports) != count:
        tail = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
        raise SandboxError(f"no result from the sandbox for {count - len(reports)} of {count} tests: {tail[0]}")
    return [reports[i] for i in range(count)]


def _passes(case: ValueCase, text: str | None) -> bool:
    if text is None:
        return False
    try:
        value = ast.literal_eval(text)  # only literals come back: a custom __eq__ cannot reach this comparison
        return bool(value == case.expected)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def run_tests(code: str, tests: Sequence[str | Mapping[str, Any]], limits: SandboxLimits | None = None, *,
              allow_unconfined: bool = False) -> tuple[int, int]:
    """(passed, total) of ``tests`` against ``code``, judged here from what the sandbox reports; raises
    SandboxError when a run does not finish normally, InputError for a test that cannot be judged outside."""
    cases = [parse_test(t) for t in tests]
    values = [c for c in cases if isinstance(c, ValueCase)]
    passed = 0
    if values:
        nonce = secrets.token_hex(16)
        result = run_python(_HARNESS, files={"solution.py": code, "cases.json": json.dumps(
            [[c.expression, c.truth] for c in values])}, stdin=nonce + "\n", limits=limits,
            allow_unconfined=allow_unconfined)
        _check_finished(result)
        passed += sum(_passes(c, text) for c, text in zip(values, _value_reports(result, nonce, len(values)),
                                                           strict=True))
    for case in (c for c in cases if isinstance(c, IOCase)):
        result = run_python(code, stdin=case.stdin, limits=limits, allow_unconfined=allow_unconfined)
        _check_finished(result)
        if "PermissionError: sandbox:" in result.stderr or "MemoryError" in result.stderr:
            raise SandboxError("the sandbox stopped the code")
        passed += result.returncode == 0 and _same_output(result.stdout, case.stdout)
    return passed, len(cases)


def _can_confine(options: Mapping[str, Any]) -> None:
    if not options.get("allow_unconfined"):
        require_confinement()


@reward("code_tests", preflight=_can_confine)
def code_tests(
    completion: str, tests: Sequence[str | Mapping[str, Any]] | str, *, cpu_seconds: int = 5,
    wall_seconds: float = 10.0, memory_mb: int = 512, allow_unconfined: bool = False,
) -> float:
    """Fraction of ``tests`` that the completion's code passes, judged outside the sandbox (module docstring).
    A run that cannot finish is an error, not a 0. ``allow_unconfined`` runs code even where the kernel gives no
    namespaces (rlimits and in-process guards only: a hostile program can defeat them)."""
    cases = [tests] if isinstance(tests, str) else list(tests)
    if not cases:
        raise ValueError("code_tests needs at least one test")
    limits = SandboxLimits(cpu_seconds=cpu_seconds, wall_seconds=wall_seconds, memory_bytes=memory_mb * 2**20)
    passed, total = run_tests(extract_code(completion), cases, limits, allow_unconfined=allow_unconfined)
    return passed / total
