"""Token weights from the group (GTPO conflict tokens) and from the policy's entropy."""

from __future__ import annotations

import torch
from torch import Tensor

from align.advantages import group_baseline
from align.errors import InputError
from align.losses.conflict import ConflictMode, conflict_weights
from rewards.credit.base import CreditInputs, register_credit


@register_credit("gtpo_conflict", output="weights", level="token_weights")
def gtpo_conflict(x: CreditInputs, *, mode: ConflictMode = "prefix_suffix", conflict_weight: float = 2.0) -> Tensor:
    """GTPO's conflict-token weights (arXiv 2508.03772; spec §5) as a credit module: needs the whole group.

    A completion is positive if its reward is above the group mean, negative if below; tokens shared at the same
    position by positive and negative completions get ``conflict_weight`` in positive ones and 0 in negative ones
    (:func:`align.losses.conflict.conflict_weights`).
    """
    rewards = x.rewards.to(x.dtype)
    mean, _ = group_baseline(rewards, x.group_ids, ddof=0)
    weights, _ = conflict_weights(x.token_ids, x.mask, x.group_ids, torch.sign(rewards - mean), mode=mode,
                                  conflict_weight=conflict_weight)
    return weights.to(x.dtype)


@register_credit("entropy_weighted", output="weights", level="token_weights")
def entropy_weighted(x: CreditInputs, *, alpha: float = 1.0, top_fraction: float | None = None) -> Tensor:
    """Weights that follow the policy's entropy, where the decisions are (needs ``entropy``).

    Default: w_t = (H_t / mean_row H)^alpha, renormalised to mean 1 over each row, so the row's total credit is
    kept (after the entropy-weighted token rewards of arXiv 2508.04349, applied as a weight; stated departure).
    ``top_fraction = p``: weight 1 on the row's top-p share of tokens by entropy and 0 elsewhere, as "Beyond the
    80/20 Rule" (arXiv 2506.01939) with p = 0.2.
    """
    x.require("entropy_weighted", "entropy")
    assert x.entropy is not None
    mask = x.float_mask
    entropy = x.entropy.to(x.dtype).clamp(min=0) * mask
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    if top_fraction is not None:
        if not 0.0 < top_fraction <= 1.0:
            raise InputError(f"top_fraction must be in (0, 1], got {top_fraction}")
        keep = torch.ceil(top_fraction * lengths).long()  # (B, 1)
        ranked = torch.where(mask != 0, entropy, torch.full_like(entropy, -1.0)).argsort(-1, descending=True)
        rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(ranked.shape[-1]).expand_as(ranked))
        return (rank < keep).to(x.dtype) * mask
    raw = (entropy / (entropy.sum(-1, keepdim=True) / lengths).clamp(min=1e-12)) ** alpha * mask
    return raw / (raw.sum(-1, keepdim=True) / lengths).clamp(min=1e-12)
