"""THR, Token Hidden Reward (Deng et al., ICLR 2026, arXiv 2510.03669): EXPERIMENTAL, a reconstruction.

The paper's method body was not available to us. This module implements the reconstruction in the project spec
(§7), built on the verified formulas of its predecessor NTHR:

    g_{i,t} = e_{y_{i,t}} - pi_old(. | s_{i,t}) restricted to the group's vocabulary (token ids seen in the group),
    M+ = sum over correct completions j and their tokens k of g_{j,k} h_{j,k}^T,
    s_{i,t} = g_{i,t}^T M+ h_{i,t}        (the token's influence on the likelihood of correct completions),
    THR_{i,t} = A_i s_{i,t}               (A_i: GRPO's group-normalised advantage),
    w_{i,t} = (1 + p sign(THR_{i,t})) 1[|THR_{i,t}| >= tau].

"Correct" means a reward above the group mean. Groups with no correct or only correct completions get weight 1
(NTHR skips them). p > 0 favours exploitation (greedy accuracy), p < 0 exploration (pass@k).
Verify against the paper before relying on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.advantages import group_normalize
from align.errors import InputError
from rewards.credit.base import CreditInputs, register_credit


def token_hidden_rewards(x: CreditInputs) -> Tensor:
    """THR_{i,t} as reconstructed above; needs ``logits`` (B, T, V) and ``hidden`` (B, T, D). -> (B, T)."""
    x.require("thr", "logits", "hidden")
    assert x.logits is not None and x.hidden is not None
    b, t = x.mask.shape
    if x.logits.shape[:2] != (b, t) or x.hidden.shape[:2] != (b, t):
        raise InputError(f"thr needs logits (B, T, V) and hidden (B, T, D) with (B, T) = {(b, t)}; got "
                         f"{tuple(x.logits.shape)} and {tuple(x.hidden.shape)}")
    rewards = x.rewards.to(torch.float64)
    advantages = group_normalize(rewards, x.group_ids)
    out = torch.zeros(b, t, dtype=x.dtype)
    valid = x.mask != 0
    for gid in torch.unique(x.group_ids):
        rows = (x.group_ids == gid).nonzero().squeeze(-1)
        correct = rewards[rows] > rewards[rows].mean()
        if not bool(correct.any()) or bool(correct.all()):
            continue
        ids, keep = x.token_ids[rows], valid[rows]
        vocab = torch.unique(ids[keep])  # the group's vocabulary
        probs = torch.softmax(x.logits[rows].float(), -1)[..., vocab]  # (G, T, Vg)
        g = (ids.unsqueeze(-1) == vocab).float() - probs  # (G, T, Vg)
        g = g * keep.unsqueeze(-1)
        h = x.hidden[rows].float() * keep.unsqueeze(-1)  # (G, T, D)
        m_plus = torch.einsum("jkv,jkd->vd", g[correct], h[correct])  # (Vg, D)
        s = torch.einsum("itv,vd,itd->it", g, m_plus, h)  # (G, T)
        out[rows] = (advantages[rows].unsqueeze(-1) * s).to(x.dtype)
    return out


@register_credit("thr", output="weights", level="token_weights")
def thr(x: CreditInputs, *, p: float = 0.5, tau: float = 0.0) -> Tensor:
    """EXPERIMENTAL token weights from reconstructed Token Hidden Rewards (see the module docstring)."""
    if not -1.0 <= p <= 1.0 or tau < 0:
        raise InputError(f"thr needs -1 <= p <= 1 and tau >= 0, got p={p}, tau={tau}")
    scores = token_hidden_rewards(x)
    weights = (1.0 + p * torch.sign(scores)) * (scores.abs() >= tau).to(scores.dtype)
    return weights * x.float_mask
