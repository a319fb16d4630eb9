"""Value (critic) losses: one signature, an unreduced (B, T) loss and detached stats.

``loss(values, old_values, returns, mask, **hyper) -> (loss (B, T), stats)``. ``values`` V_theta(s_t) carries the
gradient; ``old_values`` V_old(s_t) (the critic before the update, on the rollout) and ``returns`` R_t (the
critic's regression targets, GAE's A_t + V_old(s_t), arXiv 1506.02438 eq. 16) are constants. Reduction is the
step-wide token mean (:mod:`align.losses.reduce`), applied by the composition (:func:`align.objective.value_step_loss`),
so splitting a step over micro-batches or ranks never changes the loss or its gradient.

Shapes: B sequences, T response tokens; ``mask`` 1 = trainable token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from align.errors import InputError
from align.ops import check_same_shape, masked_fill_zero, masked_mean
from align.registry import Registry
from align.types import Metrics

ValueLoss = Callable[..., tuple[Tensor, Metrics]]
VALUE_LOSSES: Registry[ValueLoss] = Registry("value loss")


def _check(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    if values.dim() != 2:
        raise InputError(f"values must be (B, T) critic values V(s_t), got shape {tuple(values.shape)}")
    check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    return (mask != 0).to(values.dtype)


@VALUE_LOSSES.register("clipped_mse")
def clipped_mse(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
                clip: float | None = 0.2) -> tuple[Tensor, Metrics]:
    """PPO's clipped value loss: 0.5 max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2) per token.

    Value clipping is not in the PPO paper (Schulman et al. 2017, arXiv 1707.06347 eq. 9 has the plain squared
    error); it is OpenAI baselines' ``ppo2`` loss, kept by OpenRLHF (``value_clip`` 0.2), TRL (``cliprange_value``
    0.2) and verl (``cliprange_value``). ``clip=None`` is the unclipped 0.5 (V - R)^2. The 0.5 makes the gradient
    V - R. values (grad), old_values, returns, mask: (B, T). Returns the (B, T) loss, 0 off the mask, and stats:
    ``value/clip_frac`` (tokens where the clipped branch is the larger, so V gets no gradient),
    ``value/mean`` and ``value/error`` (mean |V - R|), token means over this call.
    """
    m = _check(values, old_values, returns, mask)
    # padding may hold anything (NaN included): zero it before any arithmetic, so no gradient can leak from it
    values = masked_fill_zero(values, m)
    old = masked_fill_zero(old_values.detach().to(values.dtype), m)
    target = masked_fill_zero(returns.detach().to(values.dtype), m)
    unclipped = (values - target) ** 2
    if clip is None:
        loss, clipped_frac = 0.5 * unclipped, torch.zeros((), dtype=values.dtype)
    else:
        if not clip > 0:
            raise InputError(f"value clip must be > 0 (OpenRLHF and TRL use 0.2) or None for no clip, got {clip}")
        clipped_value = old + (values - old).clamp(-clip, clip)
        clipped = (clipped_value - target) ** 2
        use_clipped = clipped > unclipped  # where (not max): ties take the unclipped branch, whose gradient is V - R
        loss = 0.5 * torch.where(use_clipped, clipped, unclipped)
        clipped_frac = masked_mean(use_clipped.to(values.dtype), m).detach()
    stats: Metrics = {"value/clip_frac": clipped_frac,
                      "value/mean": masked_mean(values.detach(), m),
                      "value/error": masked_mean((values.detach() - target).abs(), m)}
    return masked_fill_zero(loss, m), stats


@VALUE_LOSSES.register("mse")
def mse(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor) -> tuple[Tensor, Metrics]:
    """0.5 (V - R)^2 per token (Schulman et al. 2017, arXiv 1707.06347 eq. 9, L^VF); ``old_values`` unused.
    (B, T) in, (B, T) loss and the stats of :func:`clipped_mse`."""
    return clipped_mse(values, old_values, returns, mask, clip=None)
