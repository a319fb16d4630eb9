"""Asynchronous rollouts on the tiny model (local runtime): two weight versions ahead with partial rollouts trains
and says so in its metrics, and a run stopped right after a checkpoint with generation batches in flight resumes
to exactly the uninterrupted run's metrics, with every sample drawn trained once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from align import api
from align.trainers import controller
from align.trainers.metrics import read_metrics

from ..resume import assert_resumed_equals_reference, kill_9_then_resume
from .test_training import run, tiny_recipe

pytestmark = pytest.mark.slow

ASYNC = {"threads": 1, "max_staleness": 2, "partial_rollouts": True}


def assert_every_sample_counted_once(rows: list[dict]) -> None:
    """Cumulative counts: what was submitted is drawn or still in flight; what was drawn is trained or dropped past
    the bound (nothing else filters here: every group trains, kept_frac 1); nothing is left in flight at the end."""
    drawn = 0.0
    for r in rows:
        assert r["async/samples_submitted"] == r["async/samples_drawn"] + r["async/in_flight_samples"]
        assert r["filter/kept_frac"] == 1.0
        assert r["async/samples_drawn"] == r["async/samples_trained"] + r["async/samples_stale_dropped"]
        assert r["async/samples_drawn"] - drawn == 8 * 4  # one generation batch per step, taken once
        drawn = r["async/samples_drawn"]
    assert rows[-1]["async/in_flight"] == 0 and rows[-1]["async/samples_stale_dropped"] == 0


def test_two_versions_ahead_with_partial_rollouts_trains_on_rows_that_span_versions(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, name="async", runtime=ASYNC, learner={"lr": 1e-3, "steps": 6,
                                                                         "micro_batch_size": 16})
    rows = read_metrics(run(recipe, tmp_path).run_dir)[1:]
    assert [r["off_policy_lag"] for r in rows] == [0, 1, 2, 2, 2, 2]
    assert [r["async/in_flight"] for r in rows] == [2, 2, 2, 2, 1, 0]  # never sampled past the run's end
    for r in rows[2:]:
        # max_new_tokens 4 in chunks of 2: the first half sampled 2 versions back, the second half 1
        assert r["async/partial_rows_frac"] > 0.5
        assert 1.0 < r["async/token_staleness_mean"] < r["async/staleness_mean"] == 2.0
        assert 0.5 < r["is/weight_mean"] < 2.0  # the learner importance-weights the stale tokens
    assert "is/weight_mean" not in rows[0]
    assert_every_sample_counted_once(rows)


class Stopped(BaseException):
    """The process dies right after a checkpoint: nothing in memory survives (a BaseException, so nothing on the
    way out mistakes it for a training error)."""


@pytest.mark.parametrize("partial", [False, True])
def test_a_run_stopped_with_batches_in_flight_resumes_to_the_uninterrupted_runs_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, partial: bool) -> None:
    runtime = {**ASYNC, "partial_rollouts": partial}
    recipe = tiny_recipe(tmp_path, name="async_resume", runtime=runtime, checkpoint={"every": 3, "keep": 2},
                         learner={"lr": 1e-3, "steps": 8, "micro_batch_size": 16},
                         logging={"dir": str(tmp_path / "runs"), "tensorboard": False, "eval_every": 100})
    reference = api.train(recipe, progress=False, log=lambda _: None)

    save = controller.save_checkpoint

    def save_then_stop(directory: Path, *, step: int, **kw: object) -> Path:
        path = save(directory, step=step, **kw)  # type: ignore[arg-type]
        if step == 3:
            raise Stopped
        return path

    monkeypatch.setattr(controller, "save_checkpoint", save_then_stop)
    with pytest.raises(Stopped):
        api.train(recipe, progress=False, log=lambda _: None)
    monkeypatch.undo()
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p != reference.run_dir)
    saved = run_dir / "checkpoints" / "step-00000003"
    in_flight = json.loads((saved / "state.json").read_text())["extra"]["workload"]["in_flight"]
    assert len(in_flight) == 2 and (saved / "tensors.pt").is_file()  # two batches ahead, stored with the step
    if partial:  # the younger one mid-generation: one chunk of two sampled
        assert "partial" in in_flight[1]

    api.train(recipe, resume=run_dir, progress=False, log=lambda _: None)
    assert_resumed_equals_reference(run_dir, reference.run_dir, 3, 8)
    rows = read_metrics(run_dir)[1:]
    assert [r["off_policy_lag"] for r in rows] == [0, 1, 2, 2, 2, 2, 2, 2]
    assert_every_sample_counted_once(rows)
    assert rows[-1]["async/samples_trained"] == 8 * 8 * 4  # 8 steps of 8 prompts x 4 samples, each once


def test_kill_9_with_partial_batches_in_flight_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The process killed (SIGKILL) right after a checkpoint at step 6 or later, while two batches are in flight,
    one of them mid-generation; ``--resume-from`` continues to the uninterrupted run's metrics."""
    recipe = tiny_recipe(tmp_path, name="async_kill", runtime=ASYNC, checkpoint={"every": 3, "keep": 2},
                         learner={"lr": 1e-3, "steps": 40, "micro_batch_size": 16},
                         logging={"dir": str(tmp_path / "runs"), "tensorboard": False, "eval_every": 100})
    path = tmp_path / "async_kill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    reference = api.train(path, progress=False, log=lambda _: None)
    killed_at, run_dir = kill_9_then_resume(path, reference.run_dir, kill_after=6, timeout=120,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_resumed_equals_reference(run_dir, reference.run_dir, killed_at, 40)
    assert_every_sample_counted_once(read_metrics(run_dir)[1:])
