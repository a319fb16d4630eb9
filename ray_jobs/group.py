"""The learner ranks behind the core's :class:`~align.trainers.protocols.Learner` protocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from torch import Tensor

from align.trainers.learner import PairBatch, PolicyBatch, merge_stats
from align.trainers.protocols import LearnerLost
from ray_jobs.weight_sync import bytes_to_state


class LearnerGroup:
    """:class:`~align.trainers.protocols.Learner` over DeepSpeed ranks: each rank takes its share of a batch (whole
    groups, or pairs), and the shares' statistics are merged by the core's :func:`merge_stats`."""

    def __init__(self, ranks: list[Any], zero_stage: int) -> None:
        self.ranks, self.zero_stage = ranks, zero_stage
        self.changes = 0  # counts what changes the weights (steps, loads): copies elsewhere compare against it
        self._payload: tuple[int, bytes] | None = None  # the weights fetched at `changes`, for the next reader

    def _all(self, calls: list[Any]) -> list[Any]:
        """Every rank's answer. Answers are taken as they arrive, so a dead rank is noticed at once, not after
        the live ranks give up waiting for it in a collective."""
        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done)
            except RayActorError as err:
                raise LearnerLost(f"a learner rank died ({type(err).__name__})") from None
        return ray.get(calls)

    def step(self, batch: PolicyBatch | PairBatch) -> dict[str, float]:
        shards = batch.shards(len(self.ranks))
        self.changes += 1
        return merge_stats(self._all([r.step.remote(s) for r, s in zip(self.ranks, shards, strict=True)]))

    def evaluate(self, batch: PairBatch) -> dict[str, float]:
        shards = batch.shards(len(self.ranks))
        return merge_stats(self._all([r.evaluate.remote(s) for r, s in zip(self.ranks, shards, strict=True)]))

    def _forward(self, method: str, batch: Any) -> Tensor:
        """(B, T) from every rank's share of the rows (every rank runs a forward: ZeRO-3 gathers collectively)."""
        tokens = TokenRows(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.mask)
        shares = torch.arange(len(tokens.mask)).tensor_split(len(self.ranks))
        parts = self._all([r.forward.remote(method, tokens.take(rows if len(rows) else torch.arange(1)))
                           for r, rows in zip(self.ranks, shares, strict=True)])
        return torch.cat([p[: len(rows)] for p, rows in zip(parts, shares, strict=True)])

    def logprobs(self, batch: Any) -> Tensor:
        return self._forward("logprobs", batch)

    def ref_logprobs(self, batch: Any) -> Tensor:
        return self._forward("ref_logprobs", batch)

    def entropy(self, batch: Any) -> Tensor:
        return self._forward("entropy", batch)

    def values(self, batch: Any) -> Tensor:
        return self._forward("values", batch)

    def policy_bytes(self) -> bytes:
        """Rank 0's weights (under ZeRO-3 every rank takes part in the gather), fetched once per weight change:
        the weight sync, evaluation and the final model share one fetch."""
        if self._payload is None or self._payload[0] != self.changes:
            ranks = self.ranks if self.zero_stage == 3 else self.ranks[:1]
            self._payload = (self.changes, self._all([r.policy_bytes.remote() for r in ranks])[0])
        return self._payload[1]

    def policy_state(self) -> dict[str, Tensor]:
        return bytes_to_state(self.policy_bytes())

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._all([r.save.remote(str(directory)) for r in self.ranks])

    def load(self, directory: Path) -> None:
        self.changes += 1
        self._all([r.load.remote(str(directory)) for r in self.ranks])


@dataclass(frozen=True)
class TokenRows:
    """The token tensors of a batch (what a forward pass needs), as they travel to a rank."""

    prompt_ids: Tensor  # (B, P)
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, T)
    mask: Tensor  # (B, T)

    def take(self, rows: Tensor) -> TokenRows:
        return TokenRows(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows], self.mask[rows])
