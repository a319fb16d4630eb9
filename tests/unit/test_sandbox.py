"""Hostile snippets in the sandbox: each is contained, the code reward is an error, and scoring goes on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rewards import RewardBatch, RewardComposer, RewardTerm
from rewards.sandbox import SandboxLimits, namespaces_available, run_python

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=4.0, memory_bytes=256 * 2**20, max_processes=16)
MARKER = Path("/tmp") / f"align-sandbox-escape-{os.getpid()}"
SECRET = "s3cr3t-token-that-must-not-leak"

HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(60)",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 2**20))",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "write_outside": f"open({str(MARKER)!r}, 'w').write('escaped')",
    "write_home": "open('/root/align-escape', 'w').write('escaped')",
    "open_socket": "import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=2)",
    "read_secret": "import os\nprint(os.environ['ALIGN_SANDBOX_SECRET'])",
    "flood_stdout": "while True:\n    print('x' * 10000)",
    "delete_outside": f"import os\nos.remove({str(MARKER) + '-victim'!r})",
    "spawn_shell": "import _posixsubprocess\nprint('imported')",
    "signal_parent": "import os\nos.kill(os.getppid(), 9)",
}


@pytest.fixture(autouse=True)
def secret_in_parent_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ALIGN_SANDBOX_SECRET", SECRET)
    victim = Path(str(MARKER) + "-victim")
    victim.write_text("must survive")
    yield
    assert victim.read_text() == "must survive"
    victim.unlink()
    MARKER.unlink(missing_ok=True)


def test_ordinary_code_runs() -> None:
    result = run_python("print(sum(range(10)))", limits=LIMITS)
    assert result.ok and result.stdout.strip() == "45"
    assert {"rlimits", "clean_env"} <= set(result.isolation)


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("guards", [True, False], ids=["guards", "os_only"])
def test_hostile_snippet_is_contained(name: str, guards: bool) -> None:
    if not guards and not namespaces_available() and name in ("open_socket", "write_outside"):
        pytest.skip("without namespaces the Python guards are the network and /tmp fence (documented fallback)")
    start = time.monotonic()
    result = run_python(HOSTILE[name], limits=LIMITS, python_guards=guards)
    assert time.monotonic() - start < LIMITS.wall_seconds + 3
    # with namespaces, /tmp is the sandbox's private tmpfs (the write lands there), the parent is outside the PID
    # namespace (getppid() is 0) and a spawned shell has no network: these succeed harmlessly without the guards
    if guards or not namespaces_available() or name not in ("write_outside", "signal_parent", "spawn_shell"):
        assert not result.ok, result
    assert SECRET not in result.stdout + result.stderr
    assert not MARKER.exists()
    assert not Path("/root/align-escape").exists()
    assert len(result.stdout) <= LIMITS.max_file_bytes


def test_the_host_keeps_running_after_a_fork_bomb() -> None:
    run_python(HOSTILE["fork_bomb"], limits=LIMITS, python_guards=False)
    assert run_python("print('still here')", limits=LIMITS).stdout.strip() == "still here"


def test_code_reward_over_hostile_completions_is_an_error_and_training_goes_on() -> None:
    completions = [HOSTILE[name] for name in sorted(HOSTILE)] + ["def add(a, b):\n    return a + b"]
    n = len(completions)
    batch = RewardBatch(prompts=["write add"] * n, completions=completions, completion_ids=[[0]] * n,
                        columns={"tests": [["assert add(2, 3) == 5"]] * n})
    term = RewardTerm("code_tests", on_failure="fallback", fallback=-1.0,
                      options={"cpu_seconds": 2, "wall_seconds": 4.0, "memory_mb": 256})
    start = time.monotonic()
    scores = RewardComposer([term], workers=4).score(batch)
    assert time.monotonic() - start < 30
    by_name = dict(zip([*sorted(HOSTILE), "honest"], scores.total.tolist(), strict=True))
    assert by_name.pop("honest") == 1.0
    assert by_name.pop("read_secret") == 0.0  # the variable is simply absent: the code fails its test
    assert set(by_name.values()) == {-1.0}, by_name  # every other snippet is an error, given the fallback
    assert scores.metrics["reward/code_tests/errors"] == len(by_name)
    assert not MARKER.exists()


def test_without_namespaces_untrusted_code_is_refused_unless_the_caller_opts_in(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from rewards import sandbox

    monkeypatch.setattr(sandbox, "confinement", lambda: sandbox.Confinement(False, "unshare: Operation not permitted"))
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        run_python("print(1)", limits=LIMITS)
    message = str(refused.value)
    assert "\n" not in message and "Operation not permitted" in message and "allow_unconfined: true" in message
    result = run_python("print(1)", limits=LIMITS, allow_unconfined=True)
    assert result.ok and result.stdout.strip() == "1"
    assert "pdeathsig" in result.isolation and "netns" not in result.isolation


def test_code_reward_without_namespaces_is_an_error_that_names_the_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from rewards import sandbox

    monkeypatch.setattr(sandbox, "confinement", lambda: sandbox.Confinement(False, "no user namespaces"))
    batch = RewardBatch(prompts=["p"], completions=["def f(): return 1"], completion_ids=[[0]],
                        columns={"tests": [["assert f() == 1"]]})
    scores = RewardComposer([RewardTerm("code_tests", on_failure="drop")]).score(batch)
    assert scores.metrics["reward/code_tests/errors"] == 1
    allowed = RewardComposer([RewardTerm("code_tests", options={"allow_unconfined": True})]).score(batch)
    assert allowed.total.tolist() == [1.0]


def test_validate_refuses_the_code_reward_where_nothing_can_confine_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from align.config import RecipeError, RewardEntry
    from rewards import sandbox
    from rewards.provider import _check_options

    monkeypatch.setattr(sandbox, "confinement", lambda: sandbox.Confinement(False, "no user namespaces"))
    with pytest.raises(RecipeError, match=r"rewards\.0.*no user namespaces.*allow_unconfined: true"):
        _check_options(0, RewardEntry(name="code_tests"))
    _check_options(0, RewardEntry(name="code_tests", options={"allow_unconfined": True}))
