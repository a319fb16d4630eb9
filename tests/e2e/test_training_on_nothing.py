"""A run that cannot learn stops with exit code 2 and one line, instead of "46.9% -> 46.9%" and exit code 0 (issue 14).

Tiny random model, no SFT warm start: a few seconds per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import rewards
from align import api
from align.cli import app
from align.config import RecipeError
from align.trainers.checkpoint import latest_checkpoint
from align.trainers.workload import TrainingStopped

ROOT = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


@rewards.reward("e2e_always_fails")
def e2e_always_fails(completion: str) -> float:
    raise RuntimeError("the grader's service is unreachable")


def recipe(tmp_path: Path, **changes: object) -> dict:
    base = json.loads((ROOT / "tiny_recipe.json").read_text())
    base["model"]["cache_dir"] = str(tmp_path / "cache")
    base["logging"]["dir"] = str(tmp_path / "runs")
    base["learner"]["steps"] = 6
    base["checkpoint"]["every"] = 2
    base.update(changes)
    return base


def cli_train(tmp_path: Path, data: dict, *overrides: str) -> tuple[int, list[str]]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress", *overrides])
    assert "Traceback" not in result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.startswith("error:")]


def run_dir(tmp_path: Path) -> Path:
    [found] = (tmp_path / "runs").iterdir()
    return found


def test_a_reward_that_always_fails_stops_the_run_at_step_1_with_exit_code_2(tmp_path: Path) -> None:
    data = recipe(tmp_path, rewards=[{"name": "e2e_always_fails"}, {"name": "repetition_penalty",
                                                                      "options": {"ngram": 1}}])
    code, errors = cli_train(tmp_path, data)
    assert code == 2 and len(errors) == 1, errors
    for words in ("reward 'e2e_always_fails' failed on 32 of 32 samples at step 1",
                  "RuntimeError: the grader's service is unreachable", "guards.max_reward_failure_share: 1.0",
                  "metrics.jsonl", "no checkpoint yet"):
        assert words in errors[0], (words, errors[0])
    rows = [json.loads(line) for line in (run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["reward/e2e_always_fails/errors"] == 32


def test_uniform_rewards_stop_after_the_allowed_streak_and_keep_the_checkpoint(tmp_path: Path) -> None:
    """A random model never writes the answer: exact_match is 0 everywhere, so DAPO leaves every group out."""
    data = recipe(tmp_path, rewards=[{"name": "exact_match", "options": {"extract": "full"}}])
    with pytest.raises(TrainingStopped) as caught:
        api.train(data, "guards.max_empty_steps=2", progress=False, log=lambda _: None)
    message = str(caught.value)
    assert "3 steps in a row had no row to train on" in message and "The run stopped at step 3" in message
    saved = latest_checkpoint(run_dir(tmp_path) / "checkpoints")
    assert saved is not None and saved.name == "step-00000002" and str(saved) in message
    assert not (run_dir(tmp_path) / "summary.json").exists()  # a stopped run is not a finished one
    # allowed: the same run trains on to the end (and learns nothing, which is then the user's choice)
    allowed = api.train(recipe(tmp_path / "allowed", rewards=data["rewards"]), "guards.max_empty_steps=null",
                        progress=False, log=lambda _: None)
    assert allowed.metrics["filter/kept_frac"] == 0.0


def test_a_bad_option_value_never_starts_training(tmp_path: Path) -> None:
    data = recipe(tmp_path, rewards=[{"name": "exact_match", "options": {"extract": "nosuch_mode"}}])
    with pytest.raises(RecipeError, match=r"'rewards\.0\.options\.extract'.*'auto', 'tag', 'boxed', 'full'"):
        api.train(data, progress=False, log=lambda _: None)
    assert not (tmp_path / "runs").exists()
