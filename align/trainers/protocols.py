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

import torch
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
    # (B, T) long: the policy version that sampled each token (partial rollouts span versions; rows from several
    # generation batches differ); None: every token was sampled at weight_version
    token_versions: Tensor | None = None

    def __len__(self) -> int:
        return len(self.completions)

    def row_versions(self) -> Tensor:
        """(B,) long: the oldest policy version that sampled any of each row's trainable tokens."""
        if self.token_versions is None:
            return torch.full((len(self),), self.weight_version, dtype=torch.long)
        big = torch.iinfo(torch.long).max
        oldest = torch.where(self.mask != 0, self.token_versions, big).min(-1).values
        # a row with no trainable token (cut before its first) is as old as the rollout, never older
        return torch.where(oldest == big, self.weight_version, oldest)

    @staticmethod
    def concat(parts: Sequence[Rollout]) -> Rollout:
        """The rows of several rollouts, in order (prompts left-padded and completions right-padded to the widest);
        group ids are renumbered so groups of different parts never merge; weight_version is the oldest."""
        if len(parts) == 1:
            return parts[0]
        pad = 0  # padded positions are never attended to (prompt) or scored (completion)
        p_width = max(r.prompt_ids.shape[1] for r in parts)
        t_width = max(r.completion_ids.shape[1] for r in parts)

        def left(x: Tensor, value: float) -> Tensor:
            return torch.nn.functional.pad(x, (p_width - x.shape[1], 0), value=value)

        def right(x: Tensor, value: float) -> Tensor:
            return torch.nn.functional.pad(x, (0, t_width - x.shape[1]), value=value)

        groups, offset = [], 0
        for r in parts:
            groups.append(r.group_ids - (int(r.group_ids.min()) if len(r) else 0) + offset)
            offset = int(groups[-1].max()) + 1 if len(r) else offset
        versions = None
        if any(r.token_versions is not None for r in parts) or len({r.weight_version for r in parts}) > 1:
            versions = torch.cat([right(r.token_versions if r.token_versions is not None else
                                        torch.full_like(r.completion_ids, r.weight_version), 0) for r in parts])
            versions = versions.long()
        keys = list(parts[0].columns)
        return Rollout(
            prompts=[p for r in parts for p in r.prompts], completions=[c for r in parts for c in r.completions],
            prompt_ids=torch.cat([left(r.prompt_ids, pad) for r in parts]),
            prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in parts]),
            completion_ids=torch.cat([right(r.completion_ids, pad) for r in parts]),
            mask=torch.cat([right(r.mask, 0) for r in parts]), logp=torch.cat([right(r.logp, 0) for r in parts]),
            group_ids=torch.cat(groups), weight_version=min(r.weight_version for r in parts),
            columns={k: [v for r in parts for v in r.columns[k]] for k in keys},
            timings={k: sum(r.timings.get(k, 0.0) for r in parts) for k in parts[0].timings},
            token_versions=versions)

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
            token_versions=None if self.token_versions is None else self.token_versions[index],
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
    """An engine that can sample while the learner trains (``runtime.max_staleness``, ``runtime.overlap``)."""

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
    metrics, built from data and the parts; its state (data order, generation batches in flight: JSON values and
    tensors) is checkpointed."""

    def collect(self, step: int, version: int, prefetch: int) -> Any:
        """A :class:`~align.trainers.workload.Collected` for ``step`` (policy weights at ``version``). ``prefetch``:
        how many steps the run has left after this one (0 on the last), the most a workload may sample ahead for;
        a bool reads as 0 or 1."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
