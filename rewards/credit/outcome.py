"""Outcome credit: the sequence reward spread evenly, placed on the last token, or discounted back from it."""

from __future__ import annotations

import torch
from torch import Tensor

from align.ops import discounted_returns, last_token_mask, sequence_lengths
from rewards.credit.base import CreditInputs, register_credit


def terminal_rewards(x: CreditInputs, *, include_dense: bool = True) -> Tensor:
    """R_i on each row's last trainable token (found from the mask), plus any dense ``token_rewards``. (B, T)."""
    r = torch.where(last_token_mask(x.mask), x.rewards.to(x.dtype).unsqueeze(-1), torch.zeros((), dtype=x.dtype))
    return r if x.token_rewards is None or not include_dense else r + x.token_rewards.to(x.dtype) * x.float_mask


@register_credit("uniform", output="rewards", level="sequence")
def uniform(x: CreditInputs) -> Tensor:
    """R_i / L_i on every trainable token: the row sums to R_i (spec §7, standard module 1)."""
    lengths = sequence_lengths(x.mask).to(x.dtype).clamp(min=1)
    return (x.rewards.to(x.dtype) / lengths).unsqueeze(-1) * x.float_mask


@register_credit("last_token", output="rewards", level="sequence")
def last_token(x: CreditInputs) -> Tensor:
    """R_i on the last trainable token, 0 elsewhere (spec §7, module 2); with a ``dense_group`` or ``reinforce_pp``
    estimator at gamma = 1 every token then sees the return R_i."""
    return terminal_rewards(x)


@register_credit("discounted", output="rewards", level="token_rewards")
def discounted(x: CreditInputs, *, gamma: float = 0.99) -> Tensor:
    """Discounted returns of the terminal reward, G_t = gamma^(k_last - k_t) R_i over trainable tokens, expressed
    as token rewards r_t = G_t - G_{t+1} so that an undiscounted reward-to-go (``dense_group``, ``reinforce_pp``
    with gamma 1) recovers G_t exactly. The row sums to G_first = gamma^(L_i - 1) R_i. Dense ``token_rewards`` are
    discounted too."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    returns = discounted_returns(terminal_rewards(x), x.mask, gamma=gamma)  # (B, T) G_t
    valid = x.mask != 0
    following = torch.zeros_like(returns)  # G at the next trainable token (0 after the last)
    running = torch.zeros_like(returns[:, 0])
    for t in range(returns.shape[1] - 1, -1, -1):
        following[:, t] = running
        running = torch.where(valid[:, t], returns[:, t], running)
    return (returns - following) * x.float_mask
