"""kill -9 of a training process, then --resume-from: the check both runtimes' resume tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from align.trainers.checkpoint import latest_checkpoint
from align.trainers.metrics import TIMING_PREFIXES, read_metrics


def kill_9_then_resume(recipe: Path, reference: Path, *, kill_after: int, env: dict[str, str], timeout: float,
                       cleanup: Callable[[], None] = lambda: None) -> tuple[int, Path]:
    """Run ``align train recipe`` in a process, SIGKILL it as soon as a checkpoint at step >= ``kill_after`` is
    whole, then continue it with ``--resume-from``. ``reference`` is an uninterrupted run of the same recipe (the
    run directory to ignore). Returns the step of the checkpoint it was killed after, and the run directory."""
    command = [sys.executable, "-m", "align.cli", "train", str(recipe), "--no-progress"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at, runs = None, []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            runs = [p for p in reference.parent.iterdir() if p.is_dir() and p != reference]
            latest = latest_checkpoint(runs[0] / "checkpoints") if runs else None
            if latest is not None and int(latest.name.split("-")[1]) >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = int(latest.name.split("-")[1])
                break
            time.sleep(0.02)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        cleanup()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    try:
        out = subprocess.run([*command, "--resume-from", str(runs[0])], env=env, capture_output=True, text=True,
                             timeout=timeout * 2)
    finally:
        cleanup()
    assert out.returncode == 0, out.stderr[-2000:]
    return killed_at, runs[0]


def assert_resumed_equals_reference(run: Path, reference: Path, killed_at: int, steps: int) -> None:
    """No step lost or logged twice, and every step after the kill equal (1e-6) to the uninterrupted run's."""
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(0, steps + 1))

    def deterministic(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in rows
                if r["step"] > killed_at]

    got, expected = deterministic(rows), deterministic(read_metrics(reference))
    assert len(got) == len(expected) == steps - killed_at
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if a[key] is None or b[key] is None:
                assert a[key] == b[key], key
            else:
                assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
