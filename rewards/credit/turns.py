"""Multi-turn credit: each environment reward on the turn that earned it, the outcome on the last token."""

from __future__ import annotations

import torch
from torch import Tensor

from align.errors import InputError
from align.ops import last_token_mask
from rewards.credit.base import CreditInputs, register_credit


@register_credit("turn_rewards", output="rewards", level="token_rewards")
def turn_rewards(x: CreditInputs, *, turn_weight: float = 1.0, outcome_weight: float = 1.0) -> Tensor:
    """Per-turn rewards of a multi-turn rollout (``rollout.environment``) as token rewards.

    Row i has model turns k = 1..K_i whose last tokens sit at positions e_{i,k} (``turn_ends``), with environment
    rewards r_{i,k} (``turn_rewards``), and the sequence reward R_i, the episode's return as a run composes it: the
    recipe's rewards plus sum_k r_{i,k} (:class:`align.envs.build.EnvironmentRewards`). With l_i the row's last
    trainable token,

        r_{i,t} = turn_weight * sum_k r_{i,k} 1[t = e_{i,k}] + outcome_weight * (R_i - sum_k r_{i,k}) 1[t = l_i],

    plus any dense ``token_rewards``. With both weights 1 a row sums to R_i, so with a reward-to-go estimator
    (``dense_group``, ``reinforce_pp``, ``gae``; gamma 1) the tokens of turn k see the rewards of turn k and every
    later turn plus the outcome, never those of earlier turns: a malformed tool call is charged to the turn that
    made it and the ones before it. Observation tokens (mask 0) receive nothing and add no discount step. (B, T).
    """
    x.require("turn_rewards", "turn_rewards", "turn_ends")
    assert x.turn_rewards is not None and x.turn_ends is not None
    b, t = x.mask.shape
    if len(x.turn_rewards) != b or len(x.turn_ends) != b:
        raise InputError(f"turn_rewards and turn_ends need one row per completion ({b}); got "
                         f"{len(x.turn_rewards)} and {len(x.turn_ends)}")
    out = torch.zeros((b, t), dtype=x.dtype)
    turn_totals = torch.zeros(b, dtype=x.dtype)
    valid = (x.mask != 0).tolist()
    for i, (rewards, ends) in enumerate(zip(x.turn_rewards, x.turn_ends, strict=True)):
        if len(rewards) != len(ends):
            raise InputError(f"row {i} has {len(ends)} turn ends but {len(rewards)} turn rewards; they must match")
        for end, reward in zip(ends, rewards, strict=True):
            if not (0 <= int(end) < t and valid[i][int(end)]):
                raise InputError(f"row {i}: turn end {end} is not a trainable position of the completion (T = {t})")
            out[i, int(end)] += turn_weight * float(reward)
            turn_totals[i] += float(reward)
    outcome = (x.rewards.to(x.dtype) - turn_totals) * outcome_weight  # (B,)
    out = out + torch.where(last_token_mask(x.mask), outcome.unsqueeze(-1), torch.zeros((), dtype=x.dtype))
    if x.token_rewards is not None:
        out = out + x.token_rewards.to(x.dtype) * x.float_mask
    return out
