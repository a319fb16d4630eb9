"""Advantage estimators: one signature, (B, T) out.

``estimator(rewards, mask, group_ids, **hyper) -> (B, T)`` where ``rewards`` is (B,) one reward per sequence, or
(B, T) per-token rewards (for example a KL-in-reward penalty, or step rewards placed by a credit module); mask is
(B, T); group_ids (B,) integer, one id per prompt. Output is detached and 0 off-mask.

Sequence estimators (``grpo``, ``dr_grpo``, ``rloo``) reduce (B, T) rewards to one scalar per row by their masked
sum and broadcast one advantage over the row: their output is row-constant (``granularity="sequence"``).
Token estimators (``reinforce_pp``, ``reinforce_pp_baseline``, ``gae``, ``dense_group``) may vary along the row.

Group statistics use every row of the group, zero-length rows included (their reward is a real sample of the
policy); those rows simply receive no trainable advantage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from align.errors import InputError
from align.ops import (
    broadcast_to_tokens,
    check_finite,
    discounted_returns,
    group_stats,
    last_token_mask,
    masked_fill_zero,
    masked_sum,
    masked_whiten,
)
from align.registry import Registry

AdvantageEstimator = Callable[..., Tensor]
ADVANTAGES: Registry[AdvantageEstimator] = Registry("advantage estimator")


def _validate(rewards: Tensor, mask: Tensor, group_ids: Tensor) -> None:
    if mask.dim() != 2:
        raise InputError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    batch = mask.shape[0]
    if rewards.shape not in ((batch,), tuple(mask.shape)):
        raise InputError(f"rewards must be (B,) = ({batch},) or (B, T) = {tuple(mask.shape)}, got "
                         f"{tuple(rewards.shape)}")
    if group_ids.shape != (batch,):
        raise InputError(f"group_ids must be (B,) = ({batch},), got {tuple(group_ids.shape)}")
    check_finite("rewards", rewards, mask if rewards.dim() == 2 else None)


def _float(rewards: Tensor) -> Tensor:
    """Detached rewards in float32 (float64 kept): advantages are constants of the policy loss."""
    rewards = rewards.detach()
    return rewards if rewards.dtype == torch.float64 else rewards.to(torch.float32)


def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """One reward per row: (B,) as given, or the masked sum of (B, T) token rewards. -> (B,) float."""
    rewards = _float(rewards)
    return rewards if rewards.dim() == 1 else masked_sum(rewards, mask, dim=-1)


def token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards: (B, T) as given (0 off-mask), or a (B,) reward placed on each row's last trainable token."""
    rewards = _float(rewards)
    if rewards.dim() == 2:
        return masked_fill_zero(rewards, mask)
    return torch.where(last_token_mask(mask), rewards.unsqueeze(-1), torch.zeros((), dtype=rewards.dtype))


def group_baseline(values: Tensor, group_ids: Tensor, *, ddof: int = 1) -> tuple[Tensor, Tensor]:
    """Per-row group mean and std (``ddof`` removed); a group of size 1 gets mean 0 and std 1 (verl's rule).

    values: (B,) -> (mean (B,), std (B,)).
    """
    if ddof < 0:
        raise InputError(f"ddof must be >= 0, got {ddof}")
    stats = group_stats(values, group_ids, ddof=ddof)
    single = stats.size == 1
    mean = torch.where(single, torch.zeros_like(stats.mean), stats.mean)
    std = torch.where(single, torch.ones_like(stats.std), stats.std)
    mean = torch.where(stats.uniform & ~single, values, mean)  # r - mean is then exactly 0
    if bool(torch.isnan(std).any()):
        raise InputError(f"group std with ddof={ddof} needs groups of more than {ddof} samples; use ddof=0")
    return mean, std


def group_normalize(
    values: Tensor, group_ids: Tensor, *, scale_by_std: bool = True, ddof: int = 1, eps: float = 1e-6
) -> Tensor:
    """(v - group mean) / (group std + eps) per row, or only v - group mean. values: (B,) -> (B,)."""
    if eps < 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    mean, std = group_baseline(values, group_ids, ddof=ddof if scale_by_std else 0)
    return (values - mean) / (std + eps) if scale_by_std else values - mean


@ADVANTAGES.register("grpo", granularity="sequence")
def grpo(
    rewards: Tensor, mask: Tensor, group_ids: Tensor, *, scale_by_std: bool = True, ddof: int = 1, eps: float = 1e-6
) -> Tensor:
    """GRPO outcome advantage (Shao et al. 2024, arXiv 2402.03300 §4.1.2): (r_i - mean(r)) / (std(r) + eps).

    Broadcast to every trainable token. std is Bessel-corrected (ddof=1) with eps=1e-6 by default (project
    decision; the paper gives neither). -> (B, T).
    """
    _validate(rewards, mask, group_ids)
    seq = sequence_rewards(rewards, mask)
    adv = group_normalize(seq, group_ids, scale_by_std=scale_by_std, ddof=ddof, eps=eps)
    return broadcast_to_tokens(adv, mask)


@ADVANTAGES.register("dr_grpo", granularity="sequence")
def dr_grpo(rewards: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO advantage (Liu et al. 2025, arXiv 2503.20783 eq. 3): r_i - mean(r), no std division. -> (B, T).

    Also GTPO's advantage before its entropy shift (spec §5).
    """
    _validate(rewards, mask, group_ids)
    adv = group_normalize(sequence_rewards(rewards, mask), group_ids, scale_by_std=False)
    return broadcast_to_tokens(adv, mask)


@ADVANTAGES.register("rloo", granularity="sequence")
def rloo(rewards: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740 eq. 6): r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean r).

    Undefined for a group of one sample: raises. -> (B, T).
    """
    _validate(rewards, mask, group_ids)
    seq = sequence_rewards(rewards, mask)
    stats = group_stats(seq, group_ids, ddof=0)
    if bool((stats.size < 2).any()):
        lonely = group_ids[stats.size < 2].unique().tolist()
        raise InputError(f"rloo needs at least 2 samples per prompt; groups {lonely[:5]} have 1 "
                         "(raise samples_per_prompt or use grpo, which falls back to A = r)")
    size = stats.size.to(seq.dtype)
    adv = size / (size - 1) * (seq - stats.mean)
    return broadcast_to_tokens(adv, mask)


@ADVANTAGES.register("reinforce_pp", granularity="token")
def reinforce_pp(
    rewards: Tensor, mask: Tensor, group_ids: Tensor, *, gamma: float = 1.0, ddof: int = 1, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262 §3): discounted returns whitened over all valid tokens of the batch.

    Token rewards: a (B,) reward sits on the last trainable token; (B, T) rewards (terminal reward plus a
    KL-in-reward penalty) are used as given. A = whiten(G_t) with Bessel variance (ddof=1) and eps inside the
    rsqrt (verl; OpenRLHF uses ddof=0). ``group_ids`` is unused. Whitening is over this batch: pass the whole
    global batch. -> (B, T).
    """
    _validate(rewards, mask, group_ids)
    returns = discounted_returns(token_rewards(rewards, mask), mask, gamma=gamma)
    return masked_whiten(returns, mask, ddof=ddof, eps=eps)


@ADVANTAGES.register("reinforce_pp_baseline", granularity="token")
def reinforce_pp_baseline(
    rewards: Tensor, mask: Tensor, group_ids: Tensor, *, ddof: int = 1, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262; OpenRLHF): subtract the group mean of the sequence reward R, take
    undiscounted returns (gamma forced to 1, as OpenRLHF), then whiten over all valid tokens of the batch.

    With (B, T) rewards the group mean of their per-row sums is subtracted at the last trainable token. -> (B, T).
    """
    _validate(rewards, mask, group_ids)
    tokens = token_rewards(rewards, mask)
    mean, _ = group_baseline(sequence_rewards(rewards, mask), group_ids, ddof=0)  # (B,)
    tokens = tokens - torch.where(last_token_mask(mask), mean.unsqueeze(-1), torch.zeros((), dtype=tokens.dtype))
    returns = discounted_returns(tokens, mask, gamma=1.0)
    return masked_whiten(returns, mask, ddof=ddof, eps=eps)


@ADVANTAGES.register("gae", granularity="token")
def gae(
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    ddof: int = 1,
    eps: float = 1e-8,
) -> Tensor:
    """GAE (Schulman et al. 2016, arXiv 1506.02438 eq. 16) from critic ``values`` (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t over trainable tokens (the value after a row's last token is 0; holes in the
    mask are skipped), A_t = sum_l (gamma lam)^l delta_{t+l}. Whitened over the batch by default (verl, OpenRLHF).
    Returns = A + V (before whitening) are what the critic regresses on: :func:`gae_returns`. -> (B, T).
    """
    raw = _gae(rewards, mask, group_ids, values=values, gamma=gamma, lam=lam)
    return masked_whiten(raw, mask, ddof=ddof, eps=eps) if whiten else raw


def gae_returns(
    rewards: Tensor, mask: Tensor, group_ids: Tensor, *, values: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> Tensor:
    """Critic targets A_t + V_t with un-whitened GAE advantages. (B, T) -> (B, T), 0 off-mask."""
    raw = _gae(rewards, mask, group_ids, values=values, gamma=gamma, lam=lam)
    return masked_fill_zero(raw + values, mask)


CRITIC_RETURNS: dict[str, Callable[..., Tensor]] = {"gae": gae_returns}
"""Estimators that read critic ``values``, each with the critic's regression targets under it (a function of the
estimator's signature minus its whitening options). An algorithm trains a critic exactly when its estimator is here."""


def _gae(
    rewards: Tensor, mask: Tensor, group_ids: Tensor, *, values: Tensor | None, gamma: float, lam: float
) -> Tensor:
    _validate(rewards, mask, group_ids)
    if values is None:
        raise InputError("gae needs critic values: pass values=(B, T) tensor (one value per response token)")
    if values.shape != mask.shape:
        raise InputError(f"values must be (B, T) = {tuple(mask.shape)}, got {tuple(values.shape)}")
    check_finite("values", values, mask)
    r = token_rewards(rewards, mask)
    v = masked_fill_zero(values.detach().to(r.dtype), mask)
    valid = mask != 0
    out = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):  # vectorised over B; masked positions carry state through
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = torch.where(valid[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(valid[:, t], v[:, t], next_value)
        out[:, t] = running
    return masked_fill_zero(out, mask)


@ADVANTAGES.register("dense_group", granularity="token")
def dense_group(
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    gamma: float = 1.0,
    scale_by_std: bool = True,
    ddof: int = 1,
    eps: float = 1e-6,
) -> Tensor:
    """Group baseline that keeps dense per-token rewards (this project's estimator; no public framework has it).

    Definition. Let G_{i,t} = sum_{s >= t} gamma^(s-t) r_{i,s} be row i's reward-to-go over trainable tokens, and
    R_i = G_{i,first} its total (discounted) return. With mu_g, sigma_g the mean and std (``ddof``) of R over the
    group of row i (a group of one: 0 and 1),

        A_{i,t} = (G_{i,t} - mu_g) / (sigma_g + eps)        (``scale_by_std=False``: G_{i,t} - mu_g).

    Why this form: the baseline depends only on the prompt, as GRPO's, so it adds no bias; a penalty or bonus on a
    token moves the advantage of that token and the ones before it, never the ones after; and with a reward on the
    last token only and gamma = 1 it equals GRPO exactly on every token, so GRPO is its special case.
    Trade-off: with rewards spread along a row, later tokens see smaller returns than the baseline of whole
    returns (as any reward-to-go with a constant baseline). -> (B, T).
    """
    _validate(rewards, mask, group_ids)
    returns = discounted_returns(token_rewards(rewards, mask), mask, gamma=gamma)  # (B, T)
    valid = mask != 0
    first = valid.float().argmax(-1)  # first trainable position of each row (0 for empty rows)
    total = torch.where(valid.any(-1), returns.gather(-1, first.unsqueeze(-1)).squeeze(-1),
                        torch.zeros((), dtype=returns.dtype))  # (B,)
    mean, std = group_baseline(total, group_ids, ddof=ddof if scale_by_std else 0)  # (B,) each
    adv = returns - mean.unsqueeze(-1)
    if scale_by_std:
        adv = adv / (std + eps).unsqueeze(-1)
    return masked_fill_zero(adv, mask)


def nonuniform_groups(rewards: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling (arXiv 2503.14476 §3.2): True for rows whose group's rewards are not all equal.

    Groups with zero reward spread (all correct or all wrong, or a single sample) give no policy gradient under a
    group baseline; drop them and sample more. rewards: (B,) or (B, T); -> (B,) bool.
    """
    _validate(rewards, mask, group_ids)
    seq = sequence_rewards(rewards, mask)
    return ~group_stats(seq, group_ids, ddof=0).uniform
