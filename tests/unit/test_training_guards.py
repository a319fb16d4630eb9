"""Training on nothing stops (issue 14): a reward that fails on most samples, or steps that keep having no row to
train on, end the run with one line that says which reward failed how and how to allow it, and keep what was saved.
Uniform groups alone are not failures: only a streak of steps with no row at all stops the run."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import rewards
from align.algorithms import PRESETS
from align.trainers.controller import Controller, Schedule
from align.trainers.metrics import MetricsLogger
from align.trainers.protocols import Rollout, SamplingParams
from align.trainers.sampler import PromptSampler
from align.trainers.workload import Collected, PolicyWorkload, TrainingStopped
from rewards import RewardComposer, RewardTerm
from rewards.adapters import ComposerRewardFunction

GROUPS, SAMPLES = 2, 4  # B = 8


class FakeEngine:
    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams, seed: int | None = None) -> Rollout:
        b = len(prompts) * samples_per_prompt
        groups = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
        return Rollout(prompts=[p for p in prompts for _ in range(samples_per_prompt)], completions=["c"] * b,
                       prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2),
                       completion_ids=torch.ones(b, 3, dtype=torch.long), mask=torch.ones(b, 3),
                       logp=torch.zeros(b, 3), group_ids=groups, weight_version=0)


@rewards.reward("g_raises")
def g_raises(completion: str) -> float:
    raise ValueError("extract must be auto, tag, boxed or full, got 'nosuch_mode'")


@rewards.reward("g_uniform")
def g_uniform(completion: str) -> float:
    return 0.0


@rewards.reward("g_none")
def g_none(completion: str) -> float | None:
    return None


@rewards.reward("g_spread")
def g_spread(completion: str) -> float:
    return random.random()


@rewards.reward("g_every_fourth_step")
def g_every_fourth_step(completion: str, step: int) -> float:
    return random.random() if step % 4 == 0 else 1.0  # three steps of uniform groups, then one that trains


@rewards.reward("g_one_in_four", batched=True)
def g_one_in_four(completions: list[str]) -> list[float | str]:
    return ["oops" if i % 4 == 0 else 1.0 for i in range(len(completions))]


def workload(*terms: RewardTerm | str, preset: str = "dapo", **guards: Any) -> PolicyWorkload:
    return PolicyWorkload(spec=PRESETS.get(preset), engine=FakeEngine(),
                          rewards=ComposerRewardFunction(RewardComposer(list(terms))), learner=None,  # type: ignore[arg-type]
                          prompts=["p0", "p1"], columns={}, sampler=PromptSampler(2, 0), prompts_per_step=GROUPS,
                          samples_per_prompt=SAMPLES, sampling=SamplingParams(max_new_tokens=3), **guards)


def test_a_reward_that_fails_on_every_sample_stops_at_the_first_step_saying_why() -> None:
    work = workload("g_raises", RewardTerm("g_spread"))
    with pytest.raises(TrainingStopped) as caught:
        work.collect(1, 0, prefetch=False)
    message = str(caught.value)
    assert "\n" not in message
    for words in ("reward 'g_raises' failed on 8 of 8 samples at step 1", "raised ValueError: extract must be",
                  "'nosuch_mode'", "guards.max_reward_failure_share (0.5)", "guards.max_reward_failure_share: 1.0"):
        assert words in message, (words, message)
    assert caught.value.metrics["reward/g_raises/errors"] == 8  # the controller logs these


def test_failures_below_the_share_train_on_and_the_share_can_be_raised() -> None:
    quarter = workload(RewardTerm("g_one_in_four", on_failure="fallback"), "g_spread")
    for step in range(1, 4):
        assert quarter.collect(step, 0, prefetch=False).batch is not None  # 2 of 8 < 0.5
    allowed = workload(RewardTerm("g_raises", on_failure="fallback"), "g_spread", max_reward_failure_share=1.0)
    assert allowed.collect(1, 0, prefetch=False).batch is not None
    strict = workload(RewardTerm("g_one_in_four", on_failure="fallback"), "g_spread", max_reward_failure_share=0.2)
    with pytest.raises(TrainingStopped, match="failed on 2 of 8 samples"):
        strict.collect(1, 0, prefetch=False)


def test_none_is_a_verdict_not_a_failure_but_a_streak_of_empty_steps_stops() -> None:
    work = workload("g_none", "g_spread")
    for step in (1, 2, 3):
        assert work.collect(step, 0, prefetch=False).batch is None
    with pytest.raises(TrainingStopped) as caught:
        work.collect(4, 0, prefetch=False)
    message = str(caught.value)
    assert "4 steps in a row had no row to train on" in message
    assert "no value (None or a failure) from 'g_none' on 8" in message
    assert "guards.max_empty_steps (now 3; null never stops)" in message


def test_uniform_groups_stop_only_after_the_allowed_streak() -> None:
    work = workload("g_uniform")  # dapo leaves uniform groups out: every step is empty
    for step in (1, 2, 3):
        assert work.collect(step, 0, prefetch=False).batch is None
    with pytest.raises(TrainingStopped, match="every group left had the same reward for all its samples, which dapo "
                                              "leaves out"):
        work.collect(4, 0, prefetch=False)
    patient = workload("g_uniform", max_empty_steps=None)
    assert all(patient.collect(step, 0, prefetch=False).batch is None for step in range(1, 11))


def test_a_step_with_rows_resets_the_streak() -> None:
    work = workload("g_every_fourth_step")
    kept = [work.collect(step, 0, prefetch=False).batch is not None for step in range(1, 13)]
    assert kept == [False, False, False, True] * 3


def test_grpo_keeps_uniform_groups_so_they_never_count_as_empty() -> None:
    work = workload("g_uniform", preset="dr_grpo")
    assert all(work.collect(step, 0, prefetch=False).batch is not None for step in range(1, 6))


class FakeWorkload:
    """Trains on steps 1 and 2; step 3 is where the rewards give out."""

    def collect(self, step: int, version: int, prefetch: bool) -> Collected:
        if step == 3:
            raise TrainingStopped("reward 'x' failed on 8 of 8 samples at step 3", {"reward/x/failed": 8.0})
        return Collected(batch="rows", metrics={"reward/x/failed": 0.0})

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FakeLearner:
    def step(self, batch: Any) -> dict[str, float]:
        return {"loss": 0.0}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "weights").write_text("w")


def test_the_controller_stops_in_one_line_and_keeps_metrics_and_checkpoints(tmp_path: Path) -> None:
    controller = Controller(workload=FakeWorkload(), learner=FakeLearner(),  # type: ignore[arg-type]
                            schedule=Schedule(steps=10, eval_every=100, sample_every=100, checkpoint_every=2),
                            evaluate=lambda: {"eval/accuracy": 0.5},
                            logger=MetricsLogger(tmp_path, tensorboard=False), log=lambda _: None, progress=False)
    with pytest.raises(TrainingStopped) as caught:
        controller.run(tmp_path, None)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("reward 'x' failed on 8 of 8 samples at step 3. The run stopped at step 3")
    assert str(tmp_path / "metrics.jsonl") in message
    assert str(tmp_path / "checkpoints" / "step-00000002") in message and f"--resume-from {tmp_path}" in message
    assert (tmp_path / "checkpoints" / "step-00000002" / "learner" / "weights").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["reward/x/failed"] == 8.0 and not math.isnan(rows[0]["eval/accuracy"])
