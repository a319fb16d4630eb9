"""What the training loops need from the outside world, as protocols the core owns.

Shapes: B completions (prompts x samples), T response tokens (right-padded), P prompt tokens (left-padded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor


@dataclass
class Rollout:
    """One step's sampled completions, grouped by prompt (rows of a group are contiguous)."""

    prompts: list[str]  # (B,) prompt text, repeated per sample
    completions: list[str]  # (B,) decoded completion text, without special tokens
    prompt_ids: Tensor  # (B, P) long, left-padded with pad_id
    prompt_mask: Tensor  # (B, P) 1 = real prompt token
    completion_ids: Tensor  # (B, T) long, right-padded with pad_id
    mask: Tensor  # (B, T) float 1 = generated token up to and including the first EOS
    logp: Tensor  # (B, T) log-probs of the sampled tokens under the sampling policy (at its temperature)
    group_ids: Tensor  # (B,) long
    weight_version: int  # the policy version the engine sampled with
    columns: dict[str, list[Any]] = field(default_factory=dict)  # dataset columns per row (e.g. "answer")
    timings: dict[str, float] = field(default_factory=dict)  # seconds measured where the rollout ran ("generate")

    def __len__(self) -> int:
        return len(self.completions)

    def token_lists(self) -> list[list[int]]:
        """Each completion's trainable token ids, in order."""
        return [row[m != 0].tolist() for row, m in zip(self.completion_ids, self.mask, strict=True)]

    def select(self, keep: Tensor) -> Rollout:
        """The rows where ``keep`` (B,) bool is true."""
        index = keep.nonzero().squeeze(-1)
        rows = index.tolist()
        return Rollout(
            prompts=[self.prompts[i] for i in rows], completions=[self.completions[i] for i in rows],
            prompt_ids=self.prompt_ids[index], prompt_mask=self.prompt_mask[index],
            completion_ids=self.completion_ids[index], mask=self.mask[index], logp=self.logp[index],
            group_ids=self.group_ids[index], weight_version=self.weight_version,
            columns={k: [v[i] for i in rows] for k, v in self.columns.items()}, timings=dict(self.timings),
        )


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


class RolloutEngine(Protocol):
    """Samples completions with a known policy version."""

    weight_version: int

    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams) -> Rollout: ...

    def sync_weights(self, model: Any, version: int) -> None:
        """Make the engine sample from ``model``'s current weights, tagged ``version``."""
        ...


@dataclass
class RewardResult:
    rewards: Tensor  # (B,) float64, NaN where invalid
    valid: Tensor  # (B,) bool: False = dropped by a failing reward
    per_reward: dict[str, Tensor]  # name -> (B,) raw values
    metrics: dict[str, float]


class RewardFunction(Protocol):
    def __call__(self, rollout: Rollout, step: int) -> RewardResult: ...


@dataclass
class CreditResult:
    values: Tensor  # (B, T)
    output: str  # "rewards" or "weights"


class CreditFunction(Protocol):
    def __call__(self, rollout: Rollout, rewards: Tensor, *, logp: Tensor | None, entropy: Tensor | None,
                 token_rewards: Tensor | None) -> CreditResult: ...
