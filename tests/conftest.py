"""Shared fixtures: the spec's §10 worked example and small random batches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

WORKED_LENGTHS = (3, 5, 2, 4)
WORKED_REWARDS = (1.0, 0.0, 0.0, 1.0)


@dataclass
class Batch:
    mask: torch.Tensor  # (B, T) float64
    rewards: torch.Tensor  # (B,) float64
    group_ids: torch.Tensor  # (B,) long


def mask_from_lengths(lengths: tuple[int, ...] | list[int], width: int | None = None) -> torch.Tensor:
    width = max(lengths) if width is None else width
    mask = torch.zeros(len(lengths), width, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    return mask


@pytest.fixture
def worked() -> Batch:
    """Spec §10: G=4, r=[1,0,0,1], L=[3,5,2,4], one prompt (padded to T=5)."""
    return Batch(
        mask=mask_from_lengths(WORKED_LENGTHS),
        rewards=torch.tensor(WORKED_REWARDS, dtype=torch.float64),
        group_ids=torch.zeros(4, dtype=torch.long),
    )


def random_batch(seed: int, groups: int = 3, group_size: int = 4, width: int = 7, vocab: int = 5) -> dict:
    """A ragged batch with holes in the mask, a zero-length row, random log-probs and token ids (float64)."""
    gen = torch.Generator().manual_seed(seed)
    b = groups * group_size
    lengths = torch.randint(1, width + 1, (b,), generator=gen)
    lengths[1] = 0  # a zero-length row
    mask = (torch.arange(width).expand(b, width) < lengths.unsqueeze(1)).double()
    mask[2, 0] = 0.0 if lengths[2] > 2 else mask[2, 0]  # a hole (tool output) at the start of a row
    logp = -torch.rand(b, width, generator=gen, dtype=torch.float64) * 3
    return {
        "mask": mask,
        "logp": logp,
        "old_logp": logp + 0.3 * torch.randn(b, width, generator=gen, dtype=torch.float64),
        "ref_logp": logp + 0.2 * torch.randn(b, width, generator=gen, dtype=torch.float64),
        "rewards": torch.randint(0, 2, (b,), generator=gen).double(),
        "token_ids": torch.randint(0, vocab, (b, width), generator=gen),
        "group_ids": torch.arange(groups).repeat_interleave(group_size),
        "entropy": torch.rand(b, width, generator=gen, dtype=torch.float64),
    }


def loop_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reference reward-to-go in plain Python: discounting counts trainable tokens only."""
    out = torch.zeros_like(token_rewards)
    for i in range(mask.shape[0]):
        running = 0.0
        for t in reversed(range(mask.shape[1])):
            if mask[i, t]:
                running = float(token_rewards[i, t]) + gamma * running
                out[i, t] = running
    return out
