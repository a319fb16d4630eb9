"""Hostile and careless rewards (issue 14): values that are no finite float, rewards that hang forever, rewards that
edit their inputs, and option values the reward does not take. None of them may crash, leak threads, or change what
another reward or the trainer sees."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rewards
from align.cli import app
from align.errors import InputError
from rewards import RewardBatch, RewardComposer, RewardTerm
from rewards.combine import LOOP_GRACE_SECONDS, RewardThreads, merge_scores, run_with_timeouts
from rewards.registry import value_problem

B = 4
BATCH = RewardBatch(prompts=[f"p{i}" for i in range(B)], completions=["a", "bb", "ccc", "dddd"],
                    completion_ids=[[1], [2, 2], [3, 3, 3], [4, 4, 4, 4]],
                    columns={"answer": ["a", "x", "ccc", "y"], "tests": [["t0"], ["t1"], ["t2"], ["t3"]]})


# --------------------------------------------------------------------------------------------------------------------
# (a) every value that is not a finite float is an outcome, never an exception out of score()
# --------------------------------------------------------------------------------------------------------------------
class _FloatRaises:
    def __float__(self) -> float:
        raise RuntimeError("no float for you")


VALUES = {  # value -> the kind it counts as (None: a good value)
    "huge_int": (10**400, "nonfinite"),
    "huge_negative_int": (-(10**5000), "nonfinite"),  # str() of it would raise too
    "huge_fraction": (Fraction(10**400, 3), "nonfinite"),
    "huge_decimal": (Decimal("1e400"), "nonfinite"),
    "nan": (math.nan, "nonfinite"),
    "numpy_inf": (np.float32("inf"), "nonfinite"),
    "torch_nan": (torch.tensor(float("nan")), "nonfinite"),
    "torch_half_inf": (torch.tensor([70000.0]).half(), "nonfinite"),
    "true": (True, None),
    "numpy_bool": (np.bool_(True), None),
    "numpy_int": (np.int64(3), None),
    "torch_scalar": (torch.tensor(2.5), None),
    "torch_two_values": (torch.tensor([1.0, 2.0]), "errors"),
    "numpy_two_values": (np.array([1.0, 2.0]), "errors"),
    "text_number": ("1.0", "errors"),
    "complex": (1 + 2j, "errors"),
    "float_raises": (_FloatRaises(), "errors"),
    "list": ([1.0], "errors"),
}


def _register(name: str, value: object) -> None:
    if name not in rewards.REWARDS:
        rewards.register_reward(name, lambda completion, _v=value: _v)
        rewards.register_reward(name + "_b", lambda completions, _v=value: [_v] * len(completions), batched=True)


@pytest.mark.parametrize("case", sorted(VALUES))
@pytest.mark.parametrize("batched", [False, True])
def test_values_that_are_no_finite_float_follow_the_policy(case: str, batched: bool) -> None:
    value, kind = VALUES[case]
    name = f"v_{case}"
    _register(name, value)
    name += "_b" if batched else ""
    for policy in ("drop", "fallback"):
        scores = RewardComposer([RewardTerm(name, on_failure=policy, fallback=-1.0)]).score(BATCH)
        if kind is None:
            assert scores.valid.all() and torch.isfinite(scores.total).all(), case
            continue
        assert scores.metrics[f"reward/{name}/{kind}"] == B, (case, scores.metrics)
        assert scores.metrics[f"reward/{name}/failed"] == B
        assert scores.failures.get(name)
        if policy == "drop":
            assert not scores.valid.any()
        else:
            assert scores.total.tolist() == [-1.0] * B


@rewards.reward("v_batched_tensor", batched=True)
def v_batched_tensor(completions: list[str]) -> torch.Tensor:
    return torch.tensor([1.0, math.inf, 3.0, 4.0])


@rewards.reward("v_batched_array", batched=True)
def v_batched_array(completions: list[str]) -> np.ndarray:
    return np.array([1, 2, 3, 4], dtype=np.int64)


@rewards.reward("v_batched_scalar", batched=True)
def v_batched_scalar(completions: list[str]) -> float:
    return 1.0


@rewards.reward("v_big", batched=True)
def v_big(completions: list[str]) -> list[float]:
    return [1e308] * len(completions)


def test_batched_results_of_every_shape_are_counted_not_raised() -> None:
    scores = RewardComposer(["v_batched_tensor", "v_batched_array", "v_batched_scalar"]).score(BATCH)
    assert scores.metrics["reward/v_batched_tensor/nonfinite"] == 1.0
    assert scores.per_reward["v_batched_array"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert scores.metrics["reward/v_batched_scalar/wrong_count"] == B
    assert "returned a float for 4 completions" in scores.failures["v_batched_scalar"]


def test_a_finite_value_whose_weighted_value_overflows_is_nonfinite() -> None:
    scores = RewardComposer([RewardTerm("v_big", weight=10.0, on_failure="fallback")]).score(BATCH)
    assert scores.metrics["reward/v_big/nonfinite"] == B
    assert torch.isfinite(scores.total).all()
    two = RewardComposer([RewardTerm("v_big"), RewardTerm("v_batched_array", weight=1e308)]).score(BATCH)
    assert not two.valid.any()  # each term finite, their sum not: nothing to train on, and no inf reaches it


# --------------------------------------------------------------------------------------------------------------------
# (b) a reward that hangs forever holds a bounded number of threads for the whole run, and costs time once
# --------------------------------------------------------------------------------------------------------------------
RELEASE = threading.Event()  # set at the end of each test: the "forever" calls return and free their threads


@pytest.fixture(autouse=True)
def _release_hung_calls():
    RELEASE.clear()
    yield
    RELEASE.set()


@rewards.reward("h_forever", timeout=0.2)
def h_forever(completion: str) -> float:
    RELEASE.wait()
    return 1.0


@rewards.reward("h_forever_batched", batched=True, timeout=0.2)
def h_forever_batched(completions: list[str]) -> list[float]:
    RELEASE.wait()
    return [1.0] * len(completions)


@rewards.reward("h_blocks_loop", timeout=0.2)
async def h_blocks_loop(completion: str) -> float:
    RELEASE.wait()  # blocks the event loop: not even asyncio can cancel it
    return 1.0


@rewards.reward("h_some")
def h_some(completion: str) -> float:
    if completion == "bb":
        RELEASE.wait()
    return 1.0


@pytest.mark.parametrize("name", ["h_forever", "h_forever_batched", "h_blocks_loop"])
def test_a_reward_that_never_returns_holds_a_bounded_number_of_threads(name: str) -> None:
    workers = 2
    big = RewardBatch(prompts=["p"] * 32, completions=["c"] * 32, completion_ids=[[1]] * 32)
    composer = RewardComposer([RewardTerm(name, on_failure="fallback"), "t_ok_length"], workers=workers)
    before = threading.active_count()
    start = time.monotonic()
    counts = []
    for _ in range(10):
        scores = composer.score(big)
        assert scores.metrics[f"reward/{name}/timeouts"] == 32
        assert scores.valid.all()  # fallback: the other reward still trains
        counts.append(threading.active_count())
    elapsed = time.monotonic() - start
    # the old runner started one thread per call and never got them back: 1 -> 324 threads in 10 steps
    assert max(counts) - before <= 2 * workers, counts
    assert composer.threads[name].threads == composer.threads[name].size <= workers
    # every thread stuck after the first round: later rounds fail at once instead of waiting out the timeout
    assert elapsed < 0.2 + LOOP_GRACE_SECONDS + 1.5, elapsed
    assert "was not called" in scores.failures[name]


def test_a_stuck_thread_is_given_back_when_its_call_returns() -> None:
    composer = RewardComposer([RewardTerm("h_some", timeout=0.2)], workers=2)
    first = composer.score(BATCH)
    assert first.metrics["reward/h_some/timeouts"] == 1 and first.valid.tolist() == [True, False, True, True]
    assert composer.threads["h_some"].held == 1
    RELEASE.set()
    deadline = time.monotonic() + 2
    while composer.threads["h_some"].held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert composer.threads["h_some"].held == 0
    assert composer.score(BATCH).valid.all()
    assert composer.threads["h_some"].threads <= 2


def test_the_pool_runs_calls_in_parallel_and_reuses_its_threads() -> None:
    pool = RewardThreads("parallel", size=4)
    barrier = threading.Barrier(4, timeout=2)
    for _ in range(3):
        results = run_with_timeouts(pool, [lambda: barrier.wait() >= 0] * 4, timeout=2)
        assert results == [True] * 4  # four calls met at the barrier: they ran at the same time
    assert pool.threads == 4 and pool.held == 0


def test_idle_threads_exit() -> None:
    pool = RewardThreads("idle", size=3, idle_seconds=0.05)
    assert run_with_timeouts(pool, [lambda: 1] * 6, timeout=1) == [1] * 6
    deadline = time.monotonic() + 2
    while pool.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.threads == 0
    assert run_with_timeouts(pool, [lambda: 2], timeout=1) == [2]  # and come back when needed


@rewards.reward("t_ok_length")
def t_ok_length(completion: str) -> float:
    return float(len(completion))


# --------------------------------------------------------------------------------------------------------------------
# (c) a reward that edits its inputs changes nothing another reward, a later call, or the trainer sees
# --------------------------------------------------------------------------------------------------------------------
SEEN: dict[str, list[object]] = {}


@rewards.reward("m_vandal")
def m_vandal(completion_ids: list[int], tests: list[str], *, seen: list[str] = []) -> float:  # noqa: B006
    completion_ids.append(99)
    completion_ids[0] = -1
    tests.append("vandal")
    seen.append("x")  # a list option, shared by every call if it were not copied
    return float(len(seen))


@rewards.reward("m_batched_vandal", batched=True)
def m_batched_vandal(prompts: list[str], completion_ids: list[list[int]], tests: list[list[str]]) -> list[float]:
    prompts.reverse()
    prompts[0] = "changed"
    completion_ids[0].clear()
    completion_ids.pop()
    tests[1].append("vandal")
    return [1.0] * len(tests)


@rewards.reward("m_observer")
def m_observer(prompt: str, completion_ids: list[int], tests: list[str]) -> float:
    SEEN.setdefault("sample", []).append((prompt, list(completion_ids), list(tests)))
    return 1.0


@rewards.reward("m_batched_observer", batched=True)
def m_batched_observer(prompts: list[str], completion_ids: list[list[int]], tests: list[list[str]]) -> list[float]:
    SEEN["batched"] = [list(prompts), [list(c) for c in completion_ids], [list(t) for t in tests]]
    return [1.0] * len(prompts)


def test_mutations_never_reach_another_reward_a_later_call_or_the_trainer() -> None:
    SEEN.clear()
    ids = [list(c) for c in BATCH.completion_ids]
    tests = [list(t) for t in BATCH.columns["tests"]]
    batch = RewardBatch(prompts=list(BATCH.prompts), completions=list(BATCH.completions), completion_ids=ids,
                        columns={"answer": list(BATCH.columns["answer"]), "tests": tests})
    composer = RewardComposer([RewardTerm("m_vandal", options={"seen": []}), "m_batched_vandal", "m_observer",
                               "m_batched_observer"], workers=1)
    first = composer.score(batch)
    second = composer.score(batch)
    original = (list(BATCH.prompts), [list(c) for c in BATCH.completion_ids], [list(t) for t in BATCH.columns["tests"]])
    assert SEEN["sample"][:B] == list(zip(*original, strict=True))
    assert SEEN["batched"] == list(original)
    # the trainer's data is untouched
    assert (list(batch.prompts), ids, tests) == original
    # each call got a fresh copy of the list option: no call saw another's append
    assert first.per_reward["m_vandal"].tolist() == [1.0] * B == second.per_reward["m_vandal"].tolist()


def test_values_that_cannot_be_copied_are_shared_rather_than_failing() -> None:
    batch = RewardBatch(prompts=["p"], completions=["c"], completion_ids=[[1]], columns={"handle": [LOCK]})
    assert RewardComposer(["m_takes_handle"]).score(batch).total.tolist() == [1.0]


LOCK = threading.Lock()  # deepcopy refuses locks


@rewards.reward("m_takes_handle")
def m_takes_handle(handle: object) -> float:
    return float(handle is LOCK)


# --------------------------------------------------------------------------------------------------------------------
# Option values: checked against the annotation, refused in one line by validate
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("annotation", "value", "problem"), [
    (Literal["a", "b"], "a", None),
    (Literal["a", "b"], "c", "one of 'a', 'b'"),
    (Literal[1, 2], True, "one of 1, 2"),  # True == 1, but it is not the option's value
    (int, 3, None), (int, 3.0, "an integer"), (int, True, "an integer"),
    (float, 3, None), (float, "3", "a number"),
    (bool, False, None), (bool, 0, "true or false"),
    (str, "x", None), (str, 1, "a string"),
    (float | None, None, None), (float | None, "x", "a number or null"),
    (list[int], "anything", None),  # not checked here: the function's own check applies
])
def test_value_problem(annotation: object, value: object, problem: str | None) -> None:
    assert value_problem(annotation, value) == problem


def test_the_composer_refuses_an_option_value_the_reward_does_not_take() -> None:
    with pytest.raises(InputError, match=r"option 'extract' takes one of 'auto', 'tag', 'boxed', 'full'; got 'tga' "
                                         r"\(did you mean 'tag'\?\)"):
        RewardComposer([RewardTerm("exact_match", options={"extract": "tga"})])
    with pytest.raises(InputError, match="option 'ngram' takes an integer >= 1; got '3'"):
        RewardComposer([RewardTerm("repetition_penalty", options={"ngram": "3"})])


def _unresolvable(completion: str, *, mode: NoSuchType = "x") -> float:  # type: ignore[name-defined]  # noqa: F821
    return 1.0


def test_a_plugin_whose_annotations_do_not_resolve_still_works() -> None:
    if "o_unresolvable" not in rewards.REWARDS:
        rewards.register_reward("o_unresolvable", _unresolvable)
    scores = RewardComposer([RewardTerm("o_unresolvable", options={"mode": "anything"})]).score(BATCH)
    assert scores.valid.all()


RECIPE = """
name: bad
model: {path: tiny}
data: {task: arithmetic}
algorithm: {preset: grpo}
rewards: [{name: exact_match, options: {extract: nosuch_mode}}]
"""


def test_validate_refuses_a_bad_option_value_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    result = CliRunner().invoke(app, ["validate", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "'rewards.0.options.extract'" in lines[0] and "'auto', 'tag', 'boxed', 'full'" in lines[0]
    assert "'nosuch_mode'" in lines[0] and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["validate", str(path), "rewards.0.options.extract=full"])
    assert result.exit_code == 0, result.output


def test_shards_merge_their_failures() -> None:
    _register("v_huge_int", 10**400)
    composer = RewardComposer(["v_huge_int"])
    merged = merge_scores([composer.score(BATCH), composer.score(BATCH)])
    assert merged.metrics["reward/v_huge_int/failed"] == 2 * B
    assert "too large for a float" in merged.failures["v_huge_int"]


@rewards.reward("a_needs_x")
async def a_needs_x(completion: str, x: int) -> float:  # no column x: calling it raises TypeError, before any await
    await asyncio.sleep(0)
    return 1.0


def test_an_async_call_that_raises_before_its_coroutine_is_an_error() -> None:
    scores = RewardComposer(["a_needs_x"]).score(BATCH)
    assert scores.metrics["reward/a_needs_x/errors"] == B and "TypeError" in scores.failures["a_needs_x"]
