"""Adapters from the reward registry and credit modules to the trainer's protocols
(:class:`align.trainers.protocols.RewardFunction` and ``CreditFunction``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from align.trainers.protocols import CreditResult, RewardResult, Rollout
from rewards.combine import RewardBatch, RewardComposer
from rewards.credit.base import CREDIT, CreditInputs

VERIFIERS = ("exact_match", "math_equivalence", "countdown", "code_tests")
"""Rewards that return 1.0 for a correct completion: reported as accuracy, used for held-out evaluation."""


def reward_batch(rollout: Rollout, step: int) -> RewardBatch:
    return RewardBatch(prompts=rollout.prompts, completions=rollout.completions,
                       completion_ids=rollout.token_lists(), columns=rollout.columns, step=step)


class ComposerRewardFunction:
    """Scores a rollout with a :class:`RewardComposer`."""

    def __init__(self, composer: RewardComposer) -> None:
        self.composer = composer

    def __call__(self, rollout: Rollout, step: int) -> RewardResult:
        scores = self.composer.score(reward_batch(rollout, step))
        return RewardResult(rewards=scores.total, valid=scores.valid, per_reward=scores.per_reward,
                            metrics=scores.metrics, failures=scores.failures)


MODEL_OPTIONS = ("dpo_model", "ref_model", "positive_model", "negative_model")
"""Credit options that name an auxiliary model (a directory, or ``"base"``: the run's base model)."""


class CreditModuleFunction:
    """Runs one registered credit module on a rollout."""

    def __init__(self, name: str, options: Mapping[str, Any] | None = None) -> None:
        """``options``: the module's options, auxiliary models already loaded (:data:`MODEL_OPTIONS`)."""
        self.module = CREDIT.get(name)
        self.output = str(CREDIT.info(name)["output"])
        self.name, self.options = name, dict(options or {})
        self.needs_entropy = name == "entropy_weighted"

    def __call__(self, rollout: Rollout, rewards: Tensor, *, logp: Tensor | None, entropy: Tensor | None,
                 token_rewards: Tensor | None) -> CreditResult:
        inputs = CreditInputs(rewards=rewards.to(torch.float32), mask=rollout.mask, token_ids=rollout.completion_ids,
                              group_ids=rollout.group_ids, prompt_ids=rollout.prompt_ids,
                              prompt_mask=rollout.prompt_mask, logp=logp, entropy=entropy,
                              token_rewards=token_rewards)
        return CreditResult(values=self.module(inputs, **self.options), output=self.output)


def verifier(composer: RewardComposer):  # type: ignore[no-untyped-def]
    """A (prompts, completions, columns) -> scores callable for held-out evaluation."""

    def score(prompts: Any, completions: Any, columns: dict[str, Any]) -> list[float]:
        batch = RewardBatch(prompts=list(prompts), completions=list(completions),
                            completion_ids=[[] for _ in completions], columns=columns)
        values = composer.score(batch).per_reward[composer.terms[0].name]
        return [0.0 if v != v else float(v) for v in values.tolist()]  # a failed check counts as wrong

    return score
