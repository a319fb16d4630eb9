"""Policy-gradient losses: one signature, an unreduced (B, T) loss and detached stats.

Every loss takes a :class:`PolicyInputs` and keyword-only hyperparameters and returns ``(loss, stats)``: ``loss``
is (B, T), 0 wherever the mask is 0 (and carries no gradient there); ``stats`` are detached scalars averaged over
this call's trainable tokens. Reduction to a scalar is a separate step (:mod:`align.losses.reduce`), and a KL term
is added by the composition (:mod:`align.algorithms`), not here.

Losses without an importance ratio in their gradient (``reinforce``, ``cispo``) use the value of the surrogate
(``-w * A``) with the gradient of ``-w * A * log pi`` via ``exp(logp - sg(logp))``, so their loss values stay
comparable with the ratio-based losses at ratio 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from align.errors import InputError
from align.losses.conflict import ConflictMode, conflict_weights
from align.ops import masked_fill_zero, masked_mean
from align.registry import Registry
from align.types import Metrics

_MAX_LOG_RATIO = 20.0  # token log-ratio clamp before exp (verl)
_MAX_SEQ_LOG_RATIO = 10.0  # GSPO sequence log-ratio clamp (verl)


@dataclass(frozen=True)
class PolicyInputs:
    """What a policy loss sees. Per-token tensors are (B, T) over response tokens."""

    logp: Tensor  # (B, T) log pi_theta of the sampled tokens; requires grad
    old_logp: Tensor  # (B, T) log pi_old (the policy that generated the rollout)
    advantages: Tensor  # (B, T)
    mask: Tensor  # (B, T) float 0/1, 1 = trainable
    token_ids: Tensor | None = None  # (B, T) long; GTPO's conflict detection
    group_ids: Tensor | None = None  # (B,) long, one id per prompt; GTPO
    entropy: Tensor | None = None  # (B, T) full-vocabulary entropy of pi_theta, treated as a constant; GTPO


PolicyLoss = Callable[..., tuple[Tensor, Metrics]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def _check_clip(eps_low: float, eps_high: float) -> None:
    if not (0.0 <= eps_low <= 1.0) or eps_high < 0.0:
        raise InputError(f"clip ranges need 0 <= eps_low <= 1 and eps_high >= 0, got ({eps_low}, {eps_high})")


def _token_ratio(x: PolicyInputs) -> tuple[Tensor, Tensor]:
    log_ratio = (x.logp - x.old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return log_ratio.exp(), log_ratio


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Tensor, Metrics]:
    """-min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A), optionally dual-clipped; (B, T) loss and stats."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    # where (not torch.minimum): ties take the unclipped branch whole, instead of splitting the gradient.
    use_clipped = clipped < unclipped
    loss = -torch.where(use_clipped, clipped, unclipped)
    stats: Metrics = {
        "clip_frac": masked_mean(use_clipped.float(), mask).detach(),
        "clip_frac_high": masked_mean((use_clipped & (adv > 0)).float(), mask).detach(),
        "clip_frac_low": masked_mean((use_clipped & (adv < 0)).float(), mask).detach(),
    }
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise InputError(f"dual_clip must be > 1 (Ye et al. 2020 use 3), got {dual_clip}")
        bound = -dual_clip * adv  # for A < 0 the loss is capped at -c*A (arXiv 1912.09729 eq. 5)
        capped = (adv < 0) & (loss > bound)
        loss = torch.where(capped, bound, loss)
        stats["dual_clip_frac"] = masked_mean(capped.float(), mask).detach()
    return masked_fill_zero(loss, mask), stats


def _ratio_stats(ratio: Tensor, log_ratio: Tensor, mask: Tensor) -> Metrics:
    # approx_kl = E[(r - 1) - log r] (k3 of pi_old vs pi_theta): a non-negative drift diagnostic.
    return {
        "ratio_mean": masked_mean(ratio, mask).detach(),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask).detach(),
    }


def _row_advantages(adv: Tensor, mask: Tensor, loss_name: str, alternative: str) -> Tensor:
    """One advantage per row; raises if the row's trainable tokens carry different values. (B, T) -> (B,)."""
    valid = mask != 0
    high = torch.where(valid, adv, torch.full_like(adv, -torch.inf)).max(-1).values
    low = torch.where(valid, adv, torch.full_like(adv, torch.inf)).min(-1).values
    spread = torch.where(valid.any(-1), high - low, torch.zeros_like(high))
    if bool((spread > 1e-6 * (1.0 + high.abs().nan_to_num(0.0))).any()):
        raise InputError(f"{loss_name} needs one advantage per sequence, but some rows vary across tokens; "
                         f"use {alternative} for per-token advantages")
    return masked_mean(adv, mask, dim=-1)


@POLICY_LOSSES.register("ppo_clip", ratio="token", inert_at_zero_advantage=True)
def ppo_clip(
    x: PolicyInputs, *, eps_low: float = 0.2, eps_high: float | None = None, dual_clip: float | None = None
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347 eq. 7) per token.

    eps_high > eps_low is DAPO's clip-higher (arXiv 2503.14476 eq. 10); eps_high=None means symmetric.
    dual_clip=c caps the loss of negative-advantage tokens at -c*A (Ye et al. 2020, arXiv 1912.09729).
    Returns (B, T) loss and stats (clip fractions, ratio mean, approx_kl).
    """
    eps_high = eps_low if eps_high is None else eps_high
    _check_clip(eps_low, eps_high)
    ratio, log_ratio = _token_ratio(x)
    loss, stats = _clipped_surrogate(ratio, x.advantages, x.mask, eps_low, eps_high, dual_clip)
    return loss, {**stats, **_ratio_stats(ratio, log_ratio, x.mask)}


@POLICY_LOSSES.register("reinforce", ratio="none", inert_at_zero_advantage=True)
def reinforce(x: PolicyInputs) -> tuple[Tensor, Metrics]:
    """REINFORCE (Williams 1992): gradient -A * grad log pi, no ratio and no clip; value -A.

    Meant for on-policy updates (old_logp == logp); off-policy samples are not reweighted.
    """
    surrogate = torch.exp(x.logp - x.logp.detach())  # == 1, gradient grad log pi
    return masked_fill_zero(-x.advantages * surrogate, x.mask), {}


@POLICY_LOSSES.register("cispo", ratio="token", inert_at_zero_advantage=True)
def cispo(x: PolicyInputs, *, eps_low: float = 1.0, eps_high: float = 0.28) -> tuple[Tensor, Metrics]:
    """CISPO (MiniMax-M1, arXiv 2506.13585 eq. 4): clip the detached IS weight, keep every token's gradient.

    Gradient: -sg(clip(r, 1-eps_low, 1+eps_high)) * A * grad log pi; value -clip(r) * A (see module doc).
    Default eps_low=1 leaves the weight without a lower bound, as the paper does; eps_high as Trinity-RFT.
    """
    _check_clip(eps_low, eps_high)
    ratio, log_ratio = _token_ratio(x)
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high).detach()
    surrogate = torch.exp(x.logp - x.logp.detach())
    loss = masked_fill_zero(-weight * x.advantages * surrogate, x.mask)
    truncated = (ratio > 1.0 + eps_high) | (ratio < 1.0 - eps_low)
    stats = {"clip_frac": masked_mean(truncated.float(), x.mask).detach()}
    return loss, {**stats, **_ratio_stats(ratio, log_ratio, x.mask)}


def _sequence_log_ratio(x: PolicyInputs) -> Tensor:
    """log s_i = (1/L_i) sum_t (logp - old_logp), L_i clamped to >= 1 (GSPO eq. 7). -> (B,)."""
    return masked_mean(x.logp - x.old_logp, x.mask, dim=-1).clamp(max=_MAX_SEQ_LOG_RATIO)


@POLICY_LOSSES.register("gspo", ratio="sequence", inert_at_zero_advantage=True, row_advantages=True)
def gspo(x: PolicyInputs, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[Tensor, Metrics]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071 eq. 5-7): length-normalised sequence ratio, clipped per sequence.

    Each trainable token of row i carries -min(s_i A_i, clip(s_i) A_i); with ``seq_mean_token_mean`` this is
    exactly eq. 5. Needs row-constant advantages (use ``gspo_token`` otherwise). Returns (B, T) loss and stats.
    """
    _check_clip(eps_low, eps_high)
    adv = _row_advantages(x.advantages, x.mask, "gspo", "gspo_token")  # (B,)
    seq_log_ratio = _sequence_log_ratio(x)  # (B,)
    ratio = seq_log_ratio.exp()
    row_valid = (x.mask != 0).any(-1).float()
    loss_row, stats = _clipped_surrogate(ratio, adv, row_valid, eps_low, eps_high, None)
    loss = masked_fill_zero(loss_row.unsqueeze(-1).expand_as(x.mask), x.mask)
    stats = {"seq_" + k: v for k, v in stats.items()}
    stats["seq_ratio_mean"] = (ratio * row_valid).sum().detach() / row_valid.sum().clamp(min=1)
    return loss, stats


@POLICY_LOSSES.register("gspo_token", ratio="sequence_token", inert_at_zero_advantage=True)
def gspo_token(x: PolicyInputs, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[Tensor, Metrics]:
    """GSPO-token (arXiv 2507.18071 eq. 13-14): s_{i,t} = sg(s_i) * pi(y_t) / sg(pi(y_t)), per-token advantages.

    Same value, clip decision and gradient as ``gspo`` when advantages are constant per row; otherwise the hook for
    token-level credit inside a sequence-level trust region. Returns (B, T) loss and stats.
    """
    _check_clip(eps_low, eps_high)
    seq_log_ratio = _sequence_log_ratio(x).detach().unsqueeze(-1)  # (B, 1)
    log_ratio = (x.logp - x.logp.detach() + seq_log_ratio).clamp(max=_MAX_SEQ_LOG_RATIO)
    loss, stats = _clipped_surrogate(log_ratio.exp(), x.advantages, x.mask, eps_low, eps_high, None)
    return loss, stats


@POLICY_LOSSES.register("gtpo", ratio="token", needs=("token_ids", "group_ids", "entropy"),
                        row_advantages=True)
def gtpo(
    x: PolicyInputs,
    *,
    conflict_mode: ConflictMode = "prefix_suffix",
    conflict_weight: float = 2.0,
    entropy_threshold: float | None = 0.7,
    entropy_coef: float = 0.1,
    divide_by_conflicts: bool = False,
    sum_over_group: bool = False,
) -> tuple[Tensor, Metrics]:
    """GTPO (Simoni et al., arXiv 2508.03772; README formula and official code, spec §5).

    loss_{i,t} = -delta_i * (A_i - gamma <H>_i) * lambda_{i,t} * r_{i,t}, with lambda the conflict weights
    (:func:`align.losses.conflict.conflict_weights`), <H>_i the mean full-vocabulary entropy of row i (no gradient),
    delta_i = 1[<H>_i <= entropy_threshold] (the code's rule; the README's <H>_ini variant is not implemented;
    ``None`` disables the filter), gamma = entropy_coef, and r the token ratio, unclipped (GTPO has no clip).
    The entropy is the one the trainer passes: by default that of the raw logits (temperature 1), as the official
    code (:func:`align.trainers.sequences.response_outputs`, ``entropy_temperature``).
    ``divide_by_conflicts`` divides row i by max(n_conf_i, 1): in the official code, absent from the README (off).

    Completions are averaged, not summed (default, the README's 1/G): with the preset's ``seq_mean_token_mean``
    reducer the objective is (1/N) sum_i (1/L_i) sum_t ..., N counting the step's completions, so the learning
    rate does not depend on G (the project rule: every normaliser counts over the whole optimiser step). The
    official code sums the per-completion losses of a prompt's G completions instead (one prompt per step in its
    config); ``sum_over_group=True`` reproduces that: row i's loss is multiplied by the number of trainable
    completions of its group in this call (the whole group: trainers keep groups whole), which makes the objective
    sum_{i in group} (1/L_i) sum_t ..., averaged over prompts: G times the default, gradient included.
    Advantages must be row-constant: GTPO uses A_i = r_i - mean(r) (the ``dr_grpo`` estimator).
    Needs token_ids, group_ids and entropy. Returns (B, T) loss and stats.
    """
    missing = [n for n in ("token_ids", "group_ids", "entropy") if getattr(x, n) is None]
    if missing:
        raise InputError(f"gtpo needs {', '.join(missing)} (conflict tokens and the entropy filter); "
                         "pass them to the policy objective")
    assert x.token_ids is not None and x.group_ids is not None and x.entropy is not None
    adv = _row_advantages(x.advantages, x.mask, "gtpo", "gspo_token or ppo_clip")  # (B,)
    weights, n_conflict = conflict_weights(
        x.token_ids, x.mask, x.group_ids, torch.sign(adv), mode=conflict_mode, conflict_weight=conflict_weight
    )
    mean_entropy = masked_mean(x.entropy.detach().to(adv.dtype), x.mask, dim=-1)  # (B,)
    keep = torch.ones_like(adv) if entropy_threshold is None else (mean_entropy <= entropy_threshold).to(adv.dtype)
    shifted = keep * (adv - entropy_coef * mean_entropy)  # (B,)
    ratio, log_ratio = _token_ratio(x)
    loss = -shifted.unsqueeze(-1) * weights.to(ratio.dtype) * ratio
    if divide_by_conflicts:
        loss = loss / n_conflict.clamp(min=1).to(loss.dtype).unsqueeze(-1)
    if sum_over_group and len(x.group_ids):  # x G_i: completions with a trainable token in row i's group
        _, group = torch.unique(x.group_ids, return_inverse=True)
        trainable = (x.mask != 0).any(-1).to(loss.dtype)  # (B,); zero-length rows count nowhere
        group_size = torch.zeros(int(group.max()) + 1, dtype=loss.dtype, device=loss.device).index_add_(
            0, group, trainable)  # (number of groups,)
        loss = loss * group_size[group].unsqueeze(-1)
    row_valid = (x.mask != 0).any(-1)
    stats = {
        "entropy_filtered_frac": (1.0 - keep)[row_valid].mean().detach() if row_valid.any() else adv.new_zeros(()),
        "conflict_token_frac": masked_mean((weights != 1.0).float(), x.mask).detach(),
        **_ratio_stats(ratio, log_ratio, x.mask),
    }
    return masked_fill_zero(loss, x.mask), stats
