"""Resuming a finished run changes nothing and says so; a run killed after its last checkpoint gets its summary back;
a torn last line of metrics.jsonl or samples.jsonl (kill -9 mid-write) does not block a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align import api
from align.cli import app
from align.trainers.metrics import read_metrics

RECIPE = Path(__file__).with_name("tiny_recipe.json")
pytestmark = pytest.mark.slow


def train(tmp_path: Path, *overrides: str, log: list[str] | None = None, **kw) -> api.TrainResult:
    return api.train(RECIPE, f"logging.dir={tmp_path / 'runs'}", f"model.cache_dir={tmp_path / 'cache'}", *overrides,
                     progress=False, log=(log if log is not None else []).append, **kw)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file a finished run's resume must leave alone (checkpoints included)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_leaves_every_file_as_it_was(tmp_path: Path) -> None:
    first = train(tmp_path, "learner.steps=3", "checkpoint.every=2")  # 2 does not divide 3: checkpoints 2 and 3
    before = snapshot(first.run_dir)
    assert len(json.loads(before["summary.json"])) > 10
    for steps, resume in ((3, True), (2, first.run_dir), (3, first.run_dir)):  # 2: fewer steps than were trained
        log: list[str] = []
        again = train(tmp_path, f"learner.steps={steps}", "checkpoint.every=2", log=log, resume=resume)
        assert again.run_dir == first.run_dir and again.metrics == first.metrics
        assert snapshot(first.run_dir) == before, steps  # was: summary.json rewritten with 2 keys, after = before
        assert log == [f"{first.run_dir} already trained 3 steps (learner.steps={steps}): nothing to resume; "
                       "summary.json and final/ are left as they are"]
    cli = CliRunner().invoke(app, ["train", str(RECIPE), f"logging.dir={tmp_path / 'runs'}",
                                   f"model.cache_dir={tmp_path / 'cache'}", "learner.steps=3",
                                   "--resume-from", str(first.run_dir)])
    assert cli.exit_code == 0 and cli.output.count("\n") == 1 and "nothing to resume" in cli.output, cli.output
    assert snapshot(first.run_dir) == before


def test_a_run_killed_after_its_last_checkpoint_gets_the_summary_it_would_have_written(tmp_path: Path) -> None:
    first = train(tmp_path, "learner.steps=2", "checkpoint.every=1")
    summary = json.loads((first.run_dir / "summary.json").read_text())
    (first.run_dir / "summary.json").unlink()  # killed after the step-2 checkpoint, before the summary
    shutil.rmtree(first.run_dir / "final")
    with open(first.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # and a line half-written (it cannot be, but a torn tail is dropped anyway)
    log: list[str] = []
    again = train(tmp_path, "learner.steps=2", "checkpoint.every=1", log=log, resume=True)
    assert json.loads((first.run_dir / "summary.json").read_text()) == summary == again.metrics
    assert (first.run_dir / "final" / "model.safetensors").is_file()
    assert [line for line in log if line.startswith("warning:")] == [
        f"warning: {first.run_dir / 'metrics.jsonl'}: line 4 is cut short (the process writing it was killed?); "
        "dropped it"]


def test_a_torn_last_line_does_not_block_resume(tmp_path: Path) -> None:
    first = train(tmp_path, "learner.steps=4", "checkpoint.every=2", "logging.sample_every=1")
    checkpoints = first.run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000004")  # as if killed while writing step 4, after the step-2 checkpoint
    (checkpoints / "latest").write_text("step-00000002\n")
    for name in ("summary.json",):
        (first.run_dir / name).unlink()
    for name, torn in (("metrics.jsonl", b'{"step": 5, "reward/total/mean": 0.2'), ("samples.jsonl", b'{"ste')):
        with open(first.run_dir / name, "ab") as f:
            f.write(torn)
    log: list[str] = []
    train(tmp_path, "learner.steps=4", "checkpoint.every=2", "logging.sample_every=1", log=log, resume=True)
    assert [r["step"] for r in read_metrics(first.run_dir)] == [0, 1, 2, 3, 4]
    warnings = [line for line in log if line.startswith("warning:") and ".jsonl" in line]  # not dapo's refill
    assert len(warnings) == 2 and "metrics.jsonl: line 6" in warnings[0] and "samples.jsonl" in warnings[1]
    assert len(json.loads((first.run_dir / "summary.json").read_text())) > 10
