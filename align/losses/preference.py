"""Pairwise preference losses (the DPO family), token-level variants included.

Every loss takes a :class:`PreferenceInputs` (per-token log-probs of the chosen and rejected responses under the
policy and the frozen reference) and keyword-only hyperparameters, and returns ``(loss, stats)``: ``loss`` is (B,),
one value per pair, unreduced; ``stats`` are detached scalars. Chosen and rejected may have different lengths
(Tc, Tr). Losses that need full-vocabulary logits or token weights take them as extra keyword tensors.

Notation (spec §6): h(y) = sum_t m_t (logp_t - ref_logp_t), the summed log-ratio; sigma the logistic function.
Note the name clash: ``cdpo`` here is "Critical Tokens Matter" (arXiv 2411.19943), not TRL's conservative DPO, which
is ``dpo`` with ``label_smoothing``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from align.errors import InputError
from align.ops import check_finite, kl_from_logits, masked_fill_zero, masked_sum, sequence_lengths
from align.registry import Registry
from align.types import Metrics

PreferenceLoss = Callable[..., tuple[Tensor, Metrics]]
PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")


@dataclass(frozen=True)
class PreferenceInputs:
    """Per-token log-probs of a batch of B preference pairs."""

    chosen_logp: Tensor  # (B, Tc) policy
    rejected_logp: Tensor  # (B, Tr) policy
    chosen_mask: Tensor  # (B, Tc) float 0/1
    rejected_mask: Tensor  # (B, Tr) float 0/1
    ref_chosen_logp: Tensor | None = None  # (B, Tc) frozen reference; None for reference-free losses
    ref_rejected_logp: Tensor | None = None  # (B, Tr)

    def log_ratios(self) -> tuple[Tensor, Tensor]:
        """Per-token Delta_t = logp_t - ref_logp_t for chosen (B, Tc) and rejected (B, Tr), 0 off-mask."""
        if self.ref_chosen_logp is None or self.ref_rejected_logp is None:
            raise InputError("this preference loss needs reference log-probs (ref_chosen_logp, ref_rejected_logp); "
                             "use simpo for reference-free training")
        chosen = masked_fill_zero(self.chosen_logp - self.ref_chosen_logp, self.chosen_mask)
        rejected = masked_fill_zero(self.rejected_logp - self.ref_rejected_logp, self.rejected_mask)
        return chosen, rejected


def _sigmoid_loss(logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """-log sigma(z), or with label smoothing eps: -(1-eps) log sigma(z) - eps log sigma(-z). (B,) -> (B,)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise InputError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _pair_stats(chosen_reward: Tensor, rejected_reward: Tensor) -> Metrics:
    margin = (chosen_reward - rejected_reward).detach()
    return {
        "rewards/chosen": chosen_reward.detach().mean(),
        "rewards/rejected": rejected_reward.detach().mean(),
        "rewards/margin": margin.mean(),
        "rewards/accuracy": (margin > 0).float().mean(),
    }


def _token_constants(name: str, weights: Tensor | None, like: Tensor, *, default: float) -> Tensor:
    """Validate per-token constants (weights or rewards) against their log-probs; ``default`` fills when None."""
    if weights is None:
        return torch.full_like(like, default)
    if weights.shape != like.shape:
        raise InputError(f"{name} has shape {tuple(weights.shape)}; it must match its log-probs {tuple(like.shape)}")
    check_finite(name, weights)
    return weights.detach().to(like.dtype)


@PREFERENCE_LOSSES.register("dpo", reference=True)
def dpo(x: PreferenceInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290 eq. 7): -log sigma(beta [h(y_w) - h(y_l)]). -> (B,).

    ``label_smoothing`` eps > 0 gives conservative DPO (Mitchell 2023; TRL's "cDPO").
    """
    chosen, rejected = x.log_ratios()
    h_w, h_l = chosen.sum(-1), rejected.sum(-1)
    loss = _sigmoid_loss(beta * (h_w - h_l), label_smoothing)
    return loss, _pair_stats(beta * h_w, beta * h_l)


@PREFERENCE_LOSSES.register("ipo", reference=True)
def ipo(x: PreferenceInputs, *, beta: float = 0.1) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al. 2023, arXiv 2310.12036 eq. 17): (Delta - 1/(2 tau))^2 with tau = beta. -> (B,).

    Delta uses length-averaged log-ratios h(y)/L, as TRL (its comment says the IPO authors confirmed it).
    """
    if beta <= 0:
        raise InputError(f"ipo needs beta > 0 (it is the regularisation tau), got {beta}")
    chosen, rejected = x.log_ratios()
    avg_w = chosen.sum(-1) / sequence_lengths(x.chosen_mask).clamp(min=1)
    avg_l = rejected.sum(-1) / sequence_lengths(x.rejected_mask).clamp(min=1)
    loss = (avg_w - avg_l - 1.0 / (2.0 * beta)) ** 2
    return loss, _pair_stats(beta * avg_w, beta * avg_l)


@PREFERENCE_LOSSES.register("simpo", reference=False)
def simpo(x: PreferenceInputs, *, beta: float = 2.5, gamma: float = 1.375) -> tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024, arXiv 2405.14734 eq. 6): no reference model, length-normalised log-likelihood.

    -log sigma(beta/L_w sum logp(y_w) - beta/L_l sum logp(y_l) - gamma). Defaults as TRL's reproduction. -> (B,).
    """
    reward_w = beta * masked_sum(x.chosen_logp, x.chosen_mask, -1) / sequence_lengths(x.chosen_mask).clamp(min=1)
    reward_l = beta * masked_sum(x.rejected_logp, x.rejected_mask, -1) / sequence_lengths(x.rejected_mask).clamp(
        min=1
    )
    loss = -F.logsigmoid(reward_w - reward_l - gamma)
    return loss, _pair_stats(reward_w, reward_l)


def _sequential_kl(name: str, ref_logits: Tensor | None, logits: Tensor | None, mask: Tensor) -> Tensor:
    """SeqKL(y) = sum_t m_t KL(pi_ref(.|s_t) || pi_theta(.|s_t)) over the full vocabulary, chunked. -> (B,)."""
    if ref_logits is None or logits is None:
        raise InputError(f"tdpo needs full-vocabulary logits: pass {name}_logits and ref_{name}_logits (B, T, V)")
    if logits.shape[:-1] != mask.shape:
        raise InputError(f"{name}_logits {tuple(logits.shape)} must be (B, T, V) matching {name}_mask "
                         f"{tuple(mask.shape)}")
    return masked_sum(kl_from_logits(ref_logits, logits), mask, -1)


def _tdpo(
    x: PreferenceInputs,
    *,
    beta: float,
    alpha: float,
    stop_chosen_kl: bool,
    chosen_logits: Tensor | None,
    rejected_logits: Tensor | None,
    ref_chosen_logits: Tensor | None,
    ref_rejected_logits: Tensor | None,
) -> tuple[Tensor, Metrics]:
    chosen, rejected = x.log_ratios()
    h_w, h_l = chosen.sum(-1), rejected.sum(-1)
    kl_w = _sequential_kl("chosen", ref_chosen_logits, chosen_logits, x.chosen_mask)
    kl_l = _sequential_kl("rejected", ref_rejected_logits, rejected_logits, x.rejected_mask)
    if stop_chosen_kl:
        kl_w = kl_w.detach()
    loss = -F.logsigmoid(beta * (h_w - h_l - alpha * (kl_l - kl_w)))
    stats = _pair_stats(beta * h_w, beta * h_l)
    stats["seq_kl/chosen"] = kl_w.detach().mean()
    stats["seq_kl/rejected"] = kl_l.detach().mean()
    return loss, stats


@PREFERENCE_LOSSES.register("tdpo1", reference=True, needs_logits=True)
def tdpo1(
    x: PreferenceInputs,
    *,
    beta: float = 0.1,
    chosen_logits: Tensor | None = None,
    rejected_logits: Tensor | None = None,
    ref_chosen_logits: Tensor | None = None,
    ref_rejected_logits: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """TDPO1 (Zeng et al. 2024, arXiv 2404.11999 eq. 18): -log sigma(beta [u - (SeqKL(y_l) - SeqKL(y_w))]).

    u = h(y_w) - h(y_l); SeqKL sums the forward KL(pi_ref || pi_theta) over the full vocabulary at each position
    (computed in row chunks). Logits: (B, Tc|Tr, V). -> (B,).
    """
    return _tdpo(x, beta=beta, alpha=1.0, stop_chosen_kl=False, chosen_logits=chosen_logits,
                 rejected_logits=rejected_logits, ref_chosen_logits=ref_chosen_logits,
                 ref_rejected_logits=ref_rejected_logits)


@PREFERENCE_LOSSES.register("tdpo2", reference=True, needs_logits=True)
def tdpo2(
    x: PreferenceInputs,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    chosen_logits: Tensor | None = None,
    rejected_logits: Tensor | None = None,
    ref_chosen_logits: Tensor | None = None,
    ref_rejected_logits: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """TDPO2 (arXiv 2404.11999 eq. 20): -log sigma(beta [u - alpha (SeqKL(y_l) - sg(SeqKL(y_w)))]). -> (B,).

    The authors' README recommends TDPO2; defaults beta=0.1, alpha=0.5 as their code.
    """
    return _tdpo(x, beta=beta, alpha=alpha, stop_chosen_kl=True, chosen_logits=chosen_logits,
                 rejected_logits=rejected_logits, ref_chosen_logits=ref_chosen_logits,
                 ref_rejected_logits=ref_rejected_logits)


@PREFERENCE_LOSSES.register("cdpo", reference=True)
def cdpo(
    x: PreferenceInputs,
    *,
    beta: float = 0.1,
    chosen_weights: Tensor | None = None,
    rejected_weights: Tensor | None = None,
    per_position: bool = False,
) -> tuple[Tensor, Metrics]:
    """cDPO, "Critical Tokens Matter" (Lin et al., arXiv 2411.19943): DPO with token-weighted log-ratios.

    Paper form (default): -log sigma(beta [sum_t w^w_t Delta^w_t - sum_t w^l_t Delta^l_t]).
    ``per_position=True`` is the official code's form: -log sigma(beta [w^w_t Delta^w_t - w^l_t Delta^l_t]) at
    each aligned index t, averaged over the indices valid in either response (a missing side contributes 0).
    Weights (B, Tc) / (B, Tr) are constants; default 1 (chosen weights 1 is the code's ``only_neg``). The
    rejected weights are 1 - s_t, from the contrastive score of a positive and a negative model (credit module
    ``contrastive_critical``). With all weights 1 the paper form equals ``dpo``. -> (B,).
    """
    chosen, rejected = x.log_ratios()
    w_w = _token_constants("chosen_weights", chosen_weights, chosen, default=1.0)
    w_l = _token_constants("rejected_weights", rejected_weights, rejected, default=1.0)
    if not per_position:
        h_w, h_l = (w_w * chosen).sum(-1), (w_l * rejected).sum(-1)
        return _sigmoid_loss(beta * (h_w - h_l)), _pair_stats(beta * h_w, beta * h_l)
    width = max(chosen.shape[-1], rejected.shape[-1])
    term_w = F.pad(w_w * chosen, (0, width - chosen.shape[-1]))
    term_l = F.pad(w_l * rejected, (0, width - rejected.shape[-1]))
    valid = (F.pad(x.chosen_mask, (0, width - chosen.shape[-1])) != 0) | (
        F.pad(x.rejected_mask, (0, width - rejected.shape[-1])) != 0
    )
    per_token = masked_fill_zero(-F.logsigmoid(beta * (term_w - term_l)), valid)
    loss = per_token.sum(-1) / valid.sum(-1).clamp(min=1).to(per_token.dtype)
    return loss, _pair_stats(beta * term_w.sum(-1), beta * term_l.sum(-1))


@PREFERENCE_LOSSES.register("tgdpo", reference=True)
def tgdpo(
    x: PreferenceInputs,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    chosen_token_rewards: Tensor | None = None,
    rejected_token_rewards: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """TGDPO (Zhu et al., ICML 2025, arXiv 2506.14574): DPO with token-level reward guidance.

    -log sigma( sum_t beta (1 + alpha r^w_t) Delta^w_t - sum_t beta (1 - alpha r^l_t) Delta^l_t ), where r_t is a
    constant token reward, beta (logp^dpo_t - logp^ref_t) from a trained DPO model (credit module
    ``implicit_dpo``) with this loss's beta: the paper has one beta, and recipes refuse a different credit beta.
    With no token rewards it is DPO. As the official code, nothing clips 1 +/- alpha r; the stat
    ``nonpositive_weight_frac`` reports tokens whose weight is <= 0 (lower alpha if it is not 0). -> (B,).
    """
    chosen, rejected = x.log_ratios()
    r_w = _token_constants("chosen_token_rewards", chosen_token_rewards, chosen, default=0.0)
    r_l = _token_constants("rejected_token_rewards", rejected_token_rewards, rejected, default=0.0)
    f_w = 1.0 + alpha * masked_fill_zero(r_w, x.chosen_mask)  # (B, Tc)
    f_l = 1.0 - alpha * masked_fill_zero(r_l, x.rejected_mask)  # (B, Tr)
    h_w, h_l = (f_w * chosen).sum(-1), (f_l * rejected).sum(-1)
    loss = -F.logsigmoid(beta * (h_w - h_l))
    stats = _pair_stats(beta * h_w, beta * h_l)
    nonpositive = masked_sum((f_w <= 0).float(), x.chosen_mask) + masked_sum((f_l <= 0).float(), x.rejected_mask)
    total = (x.chosen_mask != 0).sum() + (x.rejected_mask != 0).sum()
    stats["nonpositive_weight_frac"] = (nonpositive / total.clamp(min=1)).detach()
    return loss, stats
