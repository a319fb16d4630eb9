"""The parts the controller loop drives, as protocols the core owns. A runtime places them: in-process (local) or
behind Ray actors (``ray_jobs``); the loop (:mod:`align.trainers.controller`) cannot tell the difference.

- :class:`RolloutEngine` samples completions with a known weight version;
- :class:`RewardFunction` scores them; :class:`CreditFunction` spreads sequence rewards over tokens;
- :class:`Learner` takes optimiser steps (one process, or several DeepSpeed ranks behind one proxy);
- :class:`WeightSync` makes the engine sample the learner's current weights.

Shapes: B completions (prompts x samples), T response tokens (right-padded), P prompt tokens (left-padded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from align.errors import AlignError

ANSWER_IDS = "answer_ids"
"""A rollout column with each row's reference answer as token ids (the data's ``answer`` tokenised alone, no special
tokens), added when the recipe names a credit module, which may score it (``rlp_information_gain``)."""


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
        return self.take(keep.nonzero().squeeze(-1))

    def take(self, index: Tensor) -> Rollout:
        """The rows ``index`` (long, repeats allowed), in that order."""
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
    """Samples completions with a known policy version. ``seed`` (drawn by the controller from its RNG, so a
    resumed run samples the same) seeds the sampling."""

    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams, seed: int | None = None) -> Rollout: ...


@dataclass
class TokenSamples:
    """Token in, token out: one sampled continuation per input row, never re-tokenised (multi-turn rollouts and
    partial rollouts append these ids to what came before)."""

    token_ids: list[list[int]]  # per row: the sampled ids, up to and including the first EOS
    logp: list[list[float]]  # per row: their log-probs under the sampling policy (at its temperature)
    finished: list[bool]  # per row: ended with EOS (False: stopped at max_new_tokens)
    weight_version: int  # the policy version that sampled them
    timings: dict[str, float] = field(default_factory=dict)


class TokenEngine(Protocol):
    """An engine that continues token ids (one sample per row): what multi-turn and partial rollouts drive."""

    def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], *, params: SamplingParams,
                        seed: int | None = None) -> TokenSamples: ...


class PendingTokens(Protocol):
    def result(self) -> TokenSamples: ...


class PendingRollout(Protocol):
    def result(self) -> Rollout: ...


class AsyncRolloutEngine(RolloutEngine, Protocol):
    """An engine that can sample while the learner trains (``runtime.overlap``)."""

    def submit(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
               params: SamplingParams, seed: int) -> PendingRollout: ...


class WeightSync(Protocol):
    """Moves the learner's weights into the rollout engine after each optimiser step."""

    shares_module: bool  # the engine samples from the learner's own module: there is nothing to verify

    def push(self, version: int) -> None:
        """Make the engine sample from the learner's current weights, tagged ``version``."""
        ...


class LearnerLost(AlignError, RuntimeError):
    """A learner (a rank) died: the run stops cleanly, to be resumed from its last checkpoint."""


class Learner(Protocol):
    """Optimiser steps over batches (:class:`align.trainers.learner.PolicyBatch` / ``PairBatch``), and the
    forward passes the controller needs. One in-process learner, or a proxy over DeepSpeed ranks."""

    def step(self, batch: Any) -> dict[str, float]:
        """One optimiser step; the step's merged statistics."""
        ...

    def evaluate(self, batch: Any) -> dict[str, float]:
        """Preference learners: the loss and its statistics on held-out pairs, without a gradient."""
        ...

    def logprobs(self, batch: Any) -> Tensor:
        """(B, T) log-probs of the completion tokens under the current weights."""
        ...

    def ref_logprobs(self, batch: Any) -> Tensor: ...

    def entropy(self, batch: Any) -> Tensor: ...

    def values(self, batch: Any) -> Tensor:
        """(B, T) critic values V(s_t) of the completion positions under the current weights (algorithms with a
        critic: PPO, RTO)."""
        ...

    def policy_state(self) -> dict[str, Tensor]:
        """The trained weights on CPU: the full model, or the adapter alone under LoRA."""
        ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


@dataclass
class RewardResult:
    rewards: Tensor  # (B,) float64, NaN where invalid
    valid: Tensor  # (B,) bool: False = dropped by a failing reward
    per_reward: dict[str, Tensor]  # name -> (B,) raw values
    metrics: dict[str, float]  # reward/<name>/failed: how many samples it failed on (raised, hung, NaN/inf, ...)
    failures: dict[str, str] = field(default_factory=dict)  # name -> its first failure in this batch, in words


class RewardFunction(Protocol):
    def __call__(self, rollout: Rollout, step: int) -> RewardResult: ...


@dataclass
class CreditResult:
    values: Tensor  # (B, T)
    output: str  # "rewards" or "weights"


class CreditFunction(Protocol):
    def __call__(self, rollout: Rollout, rewards: Tensor, *, logp: Tensor | None, entropy: Tensor | None,
                 token_rewards: Tensor | None) -> CreditResult: ...


class Workload(Protocol):
    """What one step of the controller loop feeds the learner (:mod:`align.trainers.workload`): a batch, with its
    metrics, built from data and the parts; its state (data order) is checkpointed."""

    def collect(self, step: int, version: int, prefetch: bool) -> Any:
        """A :class:`~align.trainers.workload.Collected` for ``step`` (policy weights at ``version``)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
