"""Adapters from the reward registry and credit modules to the trainer's protocols
(:class:`align.trainers.protocols.RewardFunction` and ``CreditFunction``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from align.envs.protocol import TURN_ENDS, TURN_REWARDS
from align.trainers.protocols import ANSWER_IDS, CreditResult, RewardResult, Rollout
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


MODEL_OPTIONS = ("dpo_model", "ref_model", "positive_model", "negative_model", "policy_model", "baseline_model")
"""Credit options that name an auxiliary model (a directory; ``"base"``: the run's base model; ``"policy"``: the
learner's current weights, served through ``Learner.logprobs`` by either runtime)."""


def model_option_defaults(name: str) -> dict[str, str]:
    """The auxiliary models credit module ``name`` names by default (``policy_model="policy"`` in its signature),
    to be loaded like the recipe's own (the recipe's options override them)."""
    params = inspect.signature(CREDIT.get(name)).parameters.values()
    return {p.name: p.default for p in params if p.name in MODEL_OPTIONS and isinstance(p.default, str)}


def target_tensors(rollout: Rollout) -> tuple[Tensor | None, Tensor | None]:
    """The rows' reference answers as (target_ids (B, X) right-padded with 0, target_mask (B, X)), from the
    :data:`~align.trainers.protocols.ANSWER_IDS` column; (None, None) where the rollout has no such column."""
    rows = rollout.columns.get(ANSWER_IDS)
    if rows is None:
        return None, None
    width = max([len(r) for r in rows] + [1])
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1.0
    return ids, mask


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
        target_ids, target_mask = target_tensors(rollout)
        inputs = CreditInputs(rewards=rewards.to(torch.float32), mask=rollout.mask, token_ids=rollout.completion_ids,
                              group_ids=rollout.group_ids, prompt_ids=rollout.prompt_ids,
                              prompt_mask=rollout.prompt_mask, logp=logp, entropy=entropy,
                              token_rewards=token_rewards, target_ids=target_ids, target_mask=target_mask,
                              turn_rewards=rollout.columns.get(TURN_REWARDS), turn_ends=rollout.columns.get(TURN_ENDS))
        return CreditResult(values=self.module(inputs, **self.options), output=self.output)


def verifier(composer: RewardComposer):  # type: ignore[no-untyped-def]
    """A (prompts, completions, columns) -> scores callable for held-out evaluation."""

    def score(prompts: Any, completions: Any, columns: dict[str, Any]) -> list[float]:
        batch = RewardBatch(prompts=list(prompts), completions=list(completions),
                            completion_ids=[[] for _ in completions], columns=columns)
        values = composer.score(batch).per_reward[composer.terms[0].name]
        return [0.0 if v != v else float(v) for v in values.tolist()]  # a failed check counts as wrong

    return score
