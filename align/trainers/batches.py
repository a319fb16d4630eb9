"""What a learner trains on: one optimiser step's rows (or one rank's share of them), tensors only, so that they
travel to Ray ranks as they are. The step-wide normaliser and pair count travel with them: a share's loss is its
exact share of the step's loss.

Shapes: B rows, T response tokens, P prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from align.losses import RolloutCorrection, StepNormalizer

OffPolicy = Literal["token", "sequence"]  # runtime.is_level: what runtime.overlap's stale rows are weighted with


@dataclass(frozen=True)
class PolicyBatch:
    """One optimiser step's rows (or one rank's share of them), grouped by prompt (groups are contiguous)."""

    prompt_ids: Tensor  # (B, P) long, left-padded
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, T) long, right-padded
    mask: Tensor  # (B, T) float, 1 = trainable token
    logp: Tensor  # (B, T) log-probs under the sampling policy (pi_old of an on-policy step)
    advantages: Tensor  # (B, T)
    group_ids: Tensor  # (B,) long
    normalizer: StepNormalizer  # counts of the whole step, not of this share
    ref_logp: Tensor | None = None  # (B, T) when a KL term sits in the loss
    old_values: Tensor | None = None  # (B, T) V_old(s_t): the critic's values on the rollout, before the update
    returns: Tensor | None = None  # (B, T) the critic's targets (GAE: A_t + V_old(s_t), un-whitened)
    # the engine-vs-learner correction of this step (None: none): the learner recomputes pi_old and weights the
    # advantages (align/losses/rollout_correction.py)
    correction: RolloutCorrection | None = None
    standin: bool = False  # a rank with no rows of its own: one row at loss scale 0 (collectives need a backward)

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def take(self, rows: Tensor) -> PolicyBatch:
        """The rows ``rows`` (long indices), with the same step-wide normaliser."""
        return replace(self, prompt_ids=self.prompt_ids[rows], prompt_mask=self.prompt_mask[rows],
                       completion_ids=self.completion_ids[rows], mask=self.mask[rows], logp=self.logp[rows],
                       advantages=self.advantages[rows], group_ids=self.group_ids[rows],
                       ref_logp=None if self.ref_logp is None else self.ref_logp[rows],
                       old_values=None if self.old_values is None else self.old_values[rows],
                       returns=None if self.returns is None else self.returns[rows])

    @staticmethod
    def correction_for(lag: int, named: RolloutCorrection | None, level: OffPolicy = "token",
                       cap: float = 2.0) -> RolloutCorrection | None:
        """The correction of a step whose rollout lags the learner by ``lag`` weight versions: ``named``
        (``algorithm.rollout_correction``) on every step when set; else, on stale rows only (``runtime.overlap``),
        ``tis`` (``level`` token) or ``geo_tis`` (``level`` sequence) capped at ``cap``; else none."""
        if named is not None:
            return named
        return RolloutCorrection.legacy(level, cap) if lag > 0 else None

    def trimmed(self) -> PolicyBatch:
        """The same rows without the padding columns every row has: prompt columns left of the longest prompt and
        completion columns right of the last trainable token of any row. Exact: a left-padded prompt's positions
        follow its attention mask, and no scored position attends to a column after it."""
        if len(self) == 0:
            return self
        start = int(self.prompt_mask.any(0).long().argmax()) if bool(self.prompt_mask.any()) else 0
        scored = self.mask.any(0).nonzero()
        width = int(scored.max()) + 1 if len(scored) else 1
        if start == 0 and width == self.mask.shape[1]:
            return self

        def right(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[:, :width]

        return replace(self, prompt_ids=self.prompt_ids[:, start:], prompt_mask=self.prompt_mask[:, start:],
                       completion_ids=self.completion_ids[:, :width], mask=self.mask[:, :width],
                       logp=self.logp[:, :width], advantages=self.advantages[:, :width],
                       ref_logp=right(self.ref_logp), old_values=right(self.old_values), returns=right(self.returns))

    def shards(self, world_size: int) -> list[PolicyBatch]:
        """One share per rank: whole groups dealt round-robin (GTPO's conflict weights need the whole group); a rank
        left without a group gets a stand-in row that adds nothing."""
        out = []
        for rows in shard_groups(self.group_ids, world_size):
            out.append(self.take(rows) if len(rows) else replace(self.take(torch.arange(1)), standin=True))
        return out


@dataclass(frozen=True)
class PairBatch:
    """Tokenised preference pairs: prompt (B, P) left-padded; chosen (B, Tc) and rejected (B, Tr) right-padded.

    ``extras`` holds per-token inputs of token-level losses by keyword ((B, Tc) / (B, Tr)): cDPO's
    ``rejected_weights``, TGDPO's ``chosen_token_rewards`` and ``rejected_token_rewards``. ``total`` is the
    number of pairs of the whole step (the loss is a mean over it)."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    chosen_ids: Tensor
    chosen_mask: Tensor
    rejected_ids: Tensor
    rejected_mask: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    total: int = 0  # 0 = len(self)
    standin: bool = False

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    def take(self, rows: Tensor) -> PairBatch:
        return PairBatch(self.prompt_ids[rows], self.prompt_mask[rows], self.chosen_ids[rows],
                         self.chosen_mask[rows], self.rejected_ids[rows], self.rejected_mask[rows],
                         {k: v[rows] for k, v in self.extras.items()}, total=self.total or len(self))

    def shards(self, world_size: int) -> list[PairBatch]:
        out = []
        for rank in range(world_size):
            rows = torch.arange(rank, len(self), world_size)
            out.append(self.take(rows) if len(rows) else replace(self.take(torch.arange(1)), standin=True))
        return out


def shard_groups(group_ids: Tensor, world_size: int) -> list[Tensor]:
    """Row indices per rank: whole groups, dealt round-robin."""
    groups = group_ids.unique_consecutive()
    return [torch.isin(group_ids, groups[r::world_size]).nonzero().squeeze(-1) for r in range(world_size)]
