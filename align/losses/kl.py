"""KL estimators on sampled tokens (Schulman, "Approximating KL Divergence", 2020) and their two placements.

With d = logp - ref_logp on the sampled token:  k1 = d;  k2 = d^2 / 2;  k3 = exp(-d) - 1 + d  (>= 0);
``k3_plus`` = k3's value with k2's gradient (straight-through; verl's "k3+"). Used as a loss, k1 and k3 give biased
gradients of KL; k2's gradient matches the reverse-KL gradient on-policy (spec §0).

Numerics follow verl: d is clamped to [-20, 20] before exp, and k3 to at most 10.

Placement "loss" adds beta * k to each token's loss (GRPO, arXiv 2402.03300 eq. 4). Placement "reward" subtracts a
detached beta * k from the token rewards before advantages are estimated (PPO, REINFORCE++, RTO, MA-RLHF):
see :func:`kl_reward_penalty`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from align.ops import masked_fill_zero
from align.registry import Registry

KLEstimator = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")

_MAX_LOG_RATIO = 20.0
_MAX_K3 = 10.0


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return (logp - ref_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


@KL_ESTIMATORS.register("k1")
def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi/pi_ref. logp, ref_logp: (B, T) -> (B, T). Unbiased value, can be negative per token."""
    return _log_ratio(logp, ref_logp)


@KL_ESTIMATORS.register("k2")
def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log pi/pi_ref)^2 / 2. (B, T) -> (B, T). Its gradient is the on-policy reverse-KL gradient."""
    return 0.5 * _log_ratio(logp, ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0 (GRPO eq. 4). (B, T) -> (B, T), clamped to <= 10."""
    d = _log_ratio(logp, ref_logp)
    return (torch.exp(-d) - 1.0 + d).clamp(max=_MAX_K3)


@KL_ESTIMATORS.register("k3_plus")
def k3_plus(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3's value with k2's gradient (straight-through). (B, T) -> (B, T)."""
    grad_path = k2(logp, ref_logp)
    return grad_path + (k3(logp, ref_logp) - grad_path).detach()


def kl_reward_penalty(
    old_logp: Tensor, ref_logp: Tensor, mask: Tensor, *, coef: float, estimator: str = "k1"
) -> Tensor:
    """Detached per-token reward penalty -coef * k(old_logp, ref_logp) for placement "reward".

    old_logp: log-probs of the policy that generated the rollout; ref_logp: frozen reference; mask: (B, T).
    Returns (B, T), 0 off-mask; add it to the token rewards before the advantage estimator runs.
    """
    with torch.no_grad():
        return masked_fill_zero(-coef * KL_ESTIMATORS.get(estimator)(old_logp, ref_logp), mask)
