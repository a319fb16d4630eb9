"""The reward API and its fault isolation: every failure kind is contained, counted, and logged once."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest
import torch

import rewards
from align.errors import DuplicateNameError, InputError, UnknownNameError
from rewards import RewardBatch, RewardComposer, RewardTerm

BATCH = RewardBatch(
    prompts=["p0", "p1", "p2", "p3"],
    completions=["a", "bb", "ccc", "dddd"],
    completion_ids=[[1], [2, 2], [3, 3, 3], [4, 4, 4, 4]],
    columns={"answer": ["a", "x", "ccc", "y"]},
    step=7,
)


@rewards.reward("t_length")
def t_length(completion: str) -> float:
    return float(len(completion))


@rewards.reward("t_match")
def t_match(completion: str, answer: str, *, bonus: float = 1.0) -> float:
    return bonus * float(completion == answer)


@rewards.reward("t_batched", batched=True)
def t_batched(completions: list[str], completion_ids: list[list[int]], step: int) -> list[float]:
    return [len(ids) + step for ids in completion_ids]


@rewards.reward("t_async")
async def t_async(completion: str) -> float:
    await asyncio.sleep(0.01)
    return 10.0 * len(completion)


@rewards.reward("t_kwargs")
def t_kwargs(**kwargs: object) -> float:
    return float(sorted(kwargs) == ["answer", "completion", "completion_ids", "prompt", "step"])


def _flaky(completion: str) -> float | None:
    if completion == "a":
        raise RuntimeError("boom")
    if completion == "bb":
        return math.nan
    if completion == "ccc":
        return None
    return math.inf


rewards.register_reward("t_flaky", _flaky)


@rewards.reward("t_hang", timeout=0.2)
def t_hang(completion: str) -> float:
    if completion == "bb":
        time.sleep(5)
    return 1.0


@rewards.reward("t_async_hang")
async def t_async_hang(completion: str) -> float:
    if completion == "ccc":
        await asyncio.sleep(5)
    return 2.0


@rewards.reward("t_wrong_count", batched=True)
def t_wrong_count(completions: list[str]) -> list[float]:
    return [1.0] * (len(completions) - 1)


@rewards.reward("t_not_a_number")
def t_not_a_number(completion: str) -> object:
    return "high" if completion == "a" else 1


def test_registration_is_checked() -> None:
    assert {"t_length", "t_batched", "exact_match", "math_equivalence"} <= set(rewards.REWARDS.names())
    with pytest.raises(DuplicateNameError):
        rewards.register_reward("t_length", t_length)
    with pytest.raises(UnknownNameError, match="did you mean 't_length'"):
        RewardComposer(["t_lenght"])
    with pytest.raises(InputError, match="has no option 'bonsu'; valid options: bonus"):
        RewardComposer([RewardTerm("t_match", options={"bonsu": 2})])
    with pytest.raises(InputError, match="would shadow the data field"):
        RewardComposer([RewardTerm("t_match", options={"completion": "x"})])


def test_weighted_composition_sync_async_batched_and_metrics() -> None:
    composer = RewardComposer([
        RewardTerm("t_length", weight=0.5),
        RewardTerm("t_match", weight=2.0, options={"bonus": 3.0}),
        RewardTerm("t_batched", weight=1.0),
        RewardTerm("t_async", weight=0.1),
    ])
    scores = composer.score(BATCH)
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    match = torch.tensor([3.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    expected = 0.5 * lengths + 2.0 * match + (lengths + 7) + 0.1 * 10 * lengths
    torch.testing.assert_close(scores.total, expected, rtol=0, atol=1e-12)
    assert scores.valid.all()
    torch.testing.assert_close(scores.per_reward["t_match"], match, rtol=0, atol=0)
    assert scores.metrics["reward/t_length/mean"] == pytest.approx(2.5)
    assert scores.metrics["reward/t_match/errors"] == 0.0
    assert scores.metrics["reward/total/mean"] == pytest.approx(float(expected.mean()))


def test_functions_receive_only_what_they_name_or_everything_with_kwargs() -> None:
    scores = RewardComposer(["t_kwargs"]).score(BATCH)
    assert scores.total.tolist() == [1.0] * 4


@pytest.mark.parametrize(("policy", "valid", "total"), [
    ("drop", [False, False, False, False], [math.nan] * 4),
    ("fallback", [True, True, True, True], [-1.0] * 4),
])
def test_raise_nan_none_inf_follow_the_policy_and_are_counted(policy: str, valid, total) -> None:
    composer = RewardComposer([RewardTerm("t_flaky", on_failure=policy, fallback=-1.0)])
    scores = composer.score(BATCH)
    assert scores.valid.tolist() == valid
    assert [v if not math.isnan(v) else "nan" for v in scores.total.tolist()] == [
        v if not math.isnan(v) else "nan" for v in total]
    m = scores.metrics
    assert (m["reward/t_flaky/errors"], m["reward/t_flaky/nonfinite"], m["reward/t_flaky/none"]) == (1.0, 2.0, 1.0)
    assert m["reward/dropped"] == (4.0 if policy == "drop" else 0.0)


def test_a_hanging_sync_reward_times_out_and_training_goes_on() -> None:
    composer = RewardComposer([RewardTerm("t_hang", on_failure="fallback", fallback=0.0), "t_length"])
    start = time.monotonic()
    scores = composer.score(BATCH)
    assert time.monotonic() - start < 2.0
    assert scores.metrics["reward/t_hang/timeouts"] == 1.0
    assert scores.total.tolist() == [2.0, 2.0, 4.0, 5.0]


def test_a_hanging_async_reward_is_cancelled() -> None:
    composer = RewardComposer([RewardTerm("t_async_hang", timeout=0.2)])
    start = time.monotonic()
    scores = composer.score(BATCH)
    assert time.monotonic() - start < 2.0
    assert scores.valid.tolist() == [True, True, False, True]
    assert scores.metrics["reward/t_async_hang/timeouts"] == 1.0


def test_wrong_number_of_values_and_non_numbers() -> None:
    scores = RewardComposer([RewardTerm("t_wrong_count"), RewardTerm("t_not_a_number")]).score(BATCH)
    assert not scores.valid.any()
    assert scores.metrics["reward/t_wrong_count/wrong_count"] == 4.0
    assert scores.metrics["reward/t_not_a_number/errors"] == 1.0


def test_first_traceback_of_each_kind_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    composer = RewardComposer([RewardTerm("t_flaky", on_failure="fallback")])
    with caplog.at_level(logging.WARNING, logger="rewards"):
        composer.score(BATCH)
        composer.score(BATCH)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # errors, nonfinite, none: once each across two batches
    raised = [r for r in caplog.records if "raised" in r.getMessage()]
    assert raised and raised[0].exc_info and "boom" in str(raised[0].exc_info[1])


def test_batch_lengths_are_checked() -> None:
    with pytest.raises(InputError, match="has 2 completions but prompts has 1"):
        RewardBatch(prompts=["p"], completions=["a", "b"], completion_ids=[[1], [2]])


@rewards.reward("t_async_blocking")
async def t_async_blocking(completion: str) -> float:
    time.sleep(3)  # blocks the event loop: wait_for cannot cancel it
    return 1.0


def test_an_async_reward_that_blocks_the_loop_still_times_out() -> None:
    start = time.monotonic()
    scores = RewardComposer([RewardTerm("t_async_blocking", timeout=0.3)]).score(BATCH)
    assert time.monotonic() - start < 2.5
    assert scores.metrics["reward/t_async_blocking/timeouts"] == 4.0
