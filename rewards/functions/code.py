"""Code execution against tests, in the sandbox (:mod:`rewards.sandbox`).

The harness loads the completion's code, runs each test statement, and prints ``<nonce> passed total`` with a
nonce it reads from stdin first. A run that dies, times out, never prints the nonce line, or trips a sandbox limit
(memory, process count, a refused operation) is an error (the runner applies the term's failure policy); code that
is merely wrong (a syntax error, a failing assert) scores the fraction of tests passed. The grader
shares the process with the code under test, so it blocks the obvious forgeries (``sys.exit``, ``os._exit``,
printing a result line without the nonce) but is not proof against a program built to tamper with it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence

from rewards.registry import reward
from rewards.sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)

_HARNESS = """
import json, sys
nonce = sys.stdin.readline().strip()
tests = json.load(open("tests.json"))
namespace = {"__name__": "solution"}


def violation(err):
    # what the sandbox stopped, as opposed to code that is merely wrong
    if isinstance(err, (MemoryError, BlockingIOError)):
        return type(err).__name__
    if isinstance(err, PermissionError) and str(err).startswith("sandbox:"):
        return "PermissionError"
    return None


def run(source, name):
    try:
        exec(compile(source, name, "exec"), namespace)
        return True
    except BaseException as err:
        kind = violation(err)
        if kind:
            sys.stdout.write(f"\\n{nonce} violation {kind}\\n")
            sys.stdout.flush()
            raise SystemExit(3)
        return False


passed = 0
if run(open("solution.py").read(), "solution.py"):
    passed = sum(run(test, "<test>") for test in tests)
sys.stdout.write(f"\\n{nonce} {passed} {len(tests)}\\n")
"""


class SandboxError(RuntimeError):
    """The sandboxed run did not finish normally (timeout, limit, crash, missing result)."""


def extract_code(completion: str) -> str:
    """The last fenced code block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def run_tests(code: str, tests: Sequence[str], limits: SandboxLimits | None = None) -> tuple[int, int]:
    """(passed, total) of ``tests`` (Python statements, e.g. asserts) against ``code``; raises SandboxError."""
    nonce = secrets.token_hex(16)
    result = run_python(_HARNESS, files={"solution.py": code, "tests.json": json.dumps(list(tests))},
                        stdin=nonce + "\n", limits=limits)
    if result.timed_out:
        raise SandboxError(f"timed out after {result.wall_seconds:.1f}s")
    for line in reversed(result.stdout.splitlines()):
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce:
            if parts[1] == "violation":
                raise SandboxError(f"the sandbox stopped the code ({parts[2]})")
            return int(parts[1]), int(parts[2])
    tail = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
    raise SandboxError(f"no result from the sandbox: {tail[0]}")


@reward("code_tests")
def code_tests(
    completion: str, tests: Sequence[str] | str, *, cpu_seconds: int = 5, wall_seconds: float = 10.0,
    memory_mb: int = 512,
) -> float:
    """Fraction of ``tests`` (a list of Python statements, or one string of them) that pass against the
    completion's code, run in the sandbox. A run that cannot finish is an error, not a 0."""
    cases = [tests] if isinstance(tests, str) else list(tests)
    if not cases:
        raise ValueError("code_tests needs at least one test")
    limits = SandboxLimits(cpu_seconds=cpu_seconds, wall_seconds=wall_seconds, memory_bytes=memory_mb * 2**20)
    passed, total = run_tests(extract_code(completion), cases, limits)
    return passed / total
