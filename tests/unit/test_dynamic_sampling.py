"""DAPO dynamic sampling with refill (arXiv 2503.14476 §3.2): a step draws further generation batches until it holds
``prompts_per_step`` informative groups, capped by ``algorithm.max_generation_batches``, and says what it wasted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

import rewards
from align.algorithms import PRESETS
from align.config import DAPO_GENERATION_BATCHES, RecipeError, recipe_from_dict
from align.trainers.protocols import Rollout, SamplingParams
from align.trainers.workload import PolicyWorkload
from rewards import RewardComposer, RewardTerm
from rewards.adapters import ComposerRewardFunction

SAMPLES = 4
# "i...": an informative prompt (its samples alternate good and bad); "u...": every sample is bad (a uniform group)
PROMPTS = ["u0", "i1", "u2", "u3", "i4", "i5", "i6", "i7"]


class ScriptedEngine:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams, seed: int | None = None) -> Rollout:
        self.calls.append(list(prompts))
        b = len(prompts) * samples_per_prompt
        completions = ["good" if p.startswith("i") and s % 2 else "bad"
                       for p in prompts for s in range(samples_per_prompt)]
        return Rollout(prompts=[p for p in prompts for _ in range(samples_per_prompt)], completions=completions,
                       prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2),
                       completion_ids=torch.ones(b, 3, dtype=torch.long), mask=torch.ones(b, 3),
                       logp=torch.zeros(b, 3), weight_version=0,
                       group_ids=torch.arange(len(prompts)).repeat_interleave(samples_per_prompt))


class InOrder:
    """Prompts in list order, so the test knows which batch holds which groups."""

    def __init__(self) -> None:
        self.position = 0

    def next(self, n: int) -> list[int]:
        out = [(self.position + i) % len(PROMPTS) for i in range(n)]
        self.position += n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


@rewards.reward("ds_good")
def ds_good(completion: str) -> float:
    return 1.0 if completion == "good" else 0.0


def workload(batches: int, preset: str = "dapo", log: list[str] | None = None) -> PolicyWorkload:
    spec = PRESETS.get(preset).with_options(kl=None, kl_coef=0.0)  # no reference forward: no learner needed
    return PolicyWorkload(spec=spec, engine=ScriptedEngine(),
                          rewards=ComposerRewardFunction(RewardComposer([RewardTerm("ds_good")])),
                          learner=None,  # type: ignore[arg-type]
                          prompts=PROMPTS, columns={}, sampler=InOrder(), prompts_per_step=2,  # type: ignore[arg-type]
                          samples_per_prompt=SAMPLES, sampling=SamplingParams(max_new_tokens=3),
                          max_generation_batches=batches, log=None if log is None else log.append)


def test_refill_draws_until_the_step_is_full_and_keeps_the_first_informative_groups() -> None:
    work = workload(3)
    collected = work.collect(1, 0, prefetch=False)
    assert work.engine.calls == [["u0", "i1"], ["u2", "u3"], ["i4", "i5"]]  # type: ignore[attr-defined]
    assert collected.rollout is not None and collected.batch is not None
    # i1 and i4 train (the first two informative groups in draw order); i5 was sampled for nothing
    assert collected.rollout.prompts == ["i1"] * SAMPLES + ["i4"] * SAMPLES
    groups = collected.batch.group_ids.tolist()
    assert groups[:SAMPLES] == [groups[0]] * SAMPLES and groups[SAMPLES:] == [groups[-1]] * SAMPLES
    assert groups[0] != groups[-1]  # two groups, never merged although each batch numbers its groups from 0
    assert (collected.batch.advantages.abs().sum(-1) > 0).all()
    m = collected.metrics
    assert m["dynamic_sampling/generation_batches"] == 3 and m["dynamic_sampling/groups"] == 2
    assert m["dynamic_sampling/filled_frac"] == 1.0 and m["dynamic_sampling/unfilled"] == 0.0
    assert m["dynamic_sampling/wasted_frac"] == pytest.approx(12 / 24)  # u0, u2, u3
    assert m["dynamic_sampling/discarded_frac"] == pytest.approx(4 / 24)  # i5
    # the next step continues the data order after the last batch drawn
    work.collect(2, 1, prefetch=False)
    assert work.engine.calls[3] == ["i6", "i7"]  # type: ignore[attr-defined]


def test_a_refill_batch_holds_the_missing_groups_at_the_rate_seen_plus_one() -> None:
    work = workload(3)
    work.prompts_per_step = 4
    work.prompts = ["i0", "i1", "i2", "u3", "i4", "i5", "i6", "i7"]
    collected = work.collect(1, 0, prefetch=False)
    # 3 of 4 informative: 1 missing at rate 3/4 -> ceil(4/3) + 1 = 3 prompts, not a whole batch of 4
    assert work.engine.calls == [["i0", "i1", "i2", "u3"], ["i4", "i5", "i6"]]  # type: ignore[attr-defined]
    m = collected.metrics
    assert m["dynamic_sampling/groups"] == 4 and m["dynamic_sampling/generation_batches"] == 2
    assert m["dynamic_sampling/wasted_frac"] == pytest.approx(4 / 28)  # u3
    assert m["dynamic_sampling/discarded_frac"] == pytest.approx(8 / 28)  # i5, i6


def test_a_step_that_cannot_fill_trains_on_what_it_has_and_says_so_once() -> None:
    said: list[str] = []
    work = workload(2, log=said)
    collected = work.collect(1, 0, prefetch=False)
    assert len(work.engine.calls) == 2  # type: ignore[attr-defined]  # the cap
    assert collected.rollout is not None and collected.rollout.prompts == ["i1"] * SAMPLES
    assert collected.metrics["dynamic_sampling/unfilled"] == 1.0
    assert collected.metrics["dynamic_sampling/filled_frac"] == 0.5
    assert len(said) == 1 and "1 of 2 informative groups in 2 generation batches" in said[0]
    assert "algorithm.max_generation_batches: 2" in said[0] and "\n" not in said[0]
    work.sampler.load_state_dict({"position": 0})
    work.collect(2, 0, prefetch=False)
    assert len(said) == 1  # warned once per run


def test_one_generation_batch_never_refills() -> None:
    work = workload(1)
    collected = work.collect(1, 0, prefetch=False)
    assert len(work.engine.calls) == 1  # type: ignore[attr-defined]
    assert collected.rollout is not None and collected.rollout.prompts == ["i1"] * SAMPLES
    assert collected.metrics["dynamic_sampling/generation_batches"] == 1


def test_grpo_keeps_uniform_groups_and_draws_once() -> None:
    work = workload(1, preset="grpo")
    collected = work.collect(1, 0, prefetch=False)
    assert collected.rollout is not None and len(collected.rollout) == 2 * SAMPLES
    assert "dynamic_sampling/generation_batches" not in collected.metrics


def recipe(algorithm: dict[str, Any]) -> Any:
    return recipe_from_dict({"algorithm": algorithm, "rewards": [{"name": "exact_match"}]})


def test_the_recipe_key_defaults_per_algorithm_and_refuses_what_cannot_refill() -> None:
    dapo = recipe({"preset": "dapo"})
    assert dapo.algorithm.generation_batches() == DAPO_GENERATION_BATCHES
    assert recipe({"preset": "dapo", "max_generation_batches": 1}) \
        .algorithm.generation_batches() == 1
    assert recipe({"preset": "grpo"}).algorithm.generation_batches() == 1
    assert recipe({"preset": "grpo", "max_generation_batches": 4, "overrides": {"drop_uniform_groups": True}}) \
        .algorithm.generation_batches() == 4
    with pytest.raises(RecipeError) as caught:
        recipe({"preset": "grpo", "max_generation_batches": 3})
    message = str(caught.value)
    assert "\n" not in message and "algorithm.max_generation_batches" in message
    assert "drop_uniform_groups" in message and "preset dapo" in message
    with pytest.raises(RecipeError, match="max_generation_batches"):
        recipe({"preset": "dapo", "max_generation_batches": 0})
