"""Token-level preference losses guided by auxiliary models: T-REG (a regulariser on DPO) and AlignDistil (token-level
distillation toward a teacher built from a DPO and a reverse-DPO model).

Both register into :data:`~align.losses.preference.PREFERENCE_LOSSES` and follow its contract: a
:class:`~align.losses.preference.PreferenceInputs` plus keyword-only hyperparameters and extra tensors, returning a
(B,) loss per pair, unreduced, and detached scalar stats. Their token inputs come from auxiliary models, which the
rewards side runs (credit modules ``contrastive_prompting`` and ``contrastive_dpo``) and hands over as batch extras.

Shapes: B pairs, Tc / Tr chosen / rejected response tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from align.errors import InputError
from align.losses.preference import PREFERENCE_LOSSES, PreferenceInputs, _pair_stats, _token_constants
from align.ops import masked_fill_zero, masked_sum, sequence_lengths
from align.types import Metrics

ALIGNDISTIL_RESPONSES = ("both", "chosen")


# ---------------------------------------------------------------------------------------------------------------
# T-REG
# ---------------------------------------------------------------------------------------------------------------
@PREFERENCE_LOSSES.register("treg", reference=True)
def treg(
    x: PreferenceInputs,
    *,
    beta: float = 0.1,
    alpha: float = 0.25,
    chosen_token_rewards: Tensor | None = None,
    rejected_token_rewards: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """T-REG, DPO-REG form (Zhou et al., ACL 2025, arXiv 2412.02685, §3: the regularised objective):

        L = L_DPO + alpha * w * (L_REG(y_w) + L_REG(y_l)),      L_DPO = -log sigma(beta [h(y_w) - h(y_l)])
        L_REG(y) = -sum_t m_t beta r_t logp_t                   (logp_t: the policy's log-prob of token t)
        w = sg[sigma(beta h(y_l) - beta h(y_w))]                (DPO's own per-pair gradient weight)

    ``chosen_token_rewards`` (B, Tc) / ``rejected_token_rewards`` (B, Tr) are constants r_t, the self-generated
    token rewards sigma(log pi_ref(y_t | x_better, y_<t) - log pi_ref(y_t | x_worse, y_<t)) - 0.5 in (-0.5, 0.5)
    (credit module ``contrastive_prompting``); absent, they are 0 and the loss is ``dpo``. -> (B,).

    Sources and decisions. Confirmed against a paper note that reproduces the paper's equations (the paper body and
    the official code, github.com/wzhouad/T-REG, were not readable here): the token reward above, computed by the
    reference model on two opposite revision prompts; L_REG as a reward-weighted log-likelihood summed over tokens
    with the same beta as DPO (it is the simplification of maximising sum_t r_DPO(y_t) r_t, so the log-ratio form
    -beta sum_t r_t (logp_t - ref_logp_t) differs only by a constant and has the same gradient); the sequence
    weight sigma(r_DPO(y_l) - r_DPO(y_w)) taken from DPO's gradient; both responses regularised; alpha searched in
    {0.1, 0.25, 0.5}. Readings [U]: w is a constant (stop-gradient), with r_DPO = beta h as in DPO's gradient;
    alpha = 0.25 (the middle of the paper's grid) is a project default. The paper's SimPO-REG variant is not built.

    Note: the gradient is DPO's with token weights, d L / d logp^w_t = -beta w (1 + alpha r^w_t) and
    d L / d logp^l_t = beta w (1 - alpha r^l_t), i.e. TGDPO's guidance form with T-REG's bounded rewards.
    """
    if alpha < 0:
        raise InputError(f"treg needs alpha >= 0 (the regulariser's weight; the paper searches 0.1, 0.25, 0.5), "
                         f"got {alpha}")
    chosen, rejected = x.log_ratios()
    h_w, h_l = chosen.sum(-1), rejected.sum(-1)
    dpo_loss = -F.logsigmoid(beta * (h_w - h_l))  # (B,)
    weight = torch.sigmoid(beta * (h_l - h_w)).detach()  # (B,) DPO's gradient weight
    r_w = masked_fill_zero(_token_constants("chosen_token_rewards", chosen_token_rewards, chosen, default=0.0),
                           x.chosen_mask)
    r_l = masked_fill_zero(_token_constants("rejected_token_rewards", rejected_token_rewards, rejected,
                                            default=0.0), x.rejected_mask)
    reg_w = -beta * (r_w * masked_fill_zero(x.chosen_logp, x.chosen_mask)).sum(-1)  # (B,)
    reg_l = -beta * (r_l * masked_fill_zero(x.rejected_logp, x.rejected_mask)).sum(-1)  # (B,)
    regulariser = alpha * weight * (reg_w + reg_l)
    stats = _pair_stats(beta * h_w, beta * h_l)
    stats["treg/dpo_loss"] = dpo_loss.detach().mean()
    stats["treg/regulariser"] = regulariser.detach().mean()
    stats["treg/sequence_weight"] = weight.mean()
    return dpo_loss + regulariser, stats


# ---------------------------------------------------------------------------------------------------------------
# AlignDistil
# ---------------------------------------------------------------------------------------------------------------
def aligndistil_teacher(dpo_logits: Tensor, reverse_logits: Tensor, *, beta2: float = 10.0,
                        eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """AlignDistil's token-adaptive teacher (Zhang et al., ACL 2025, arXiv 2503.02832; official code
    ``songmzhang/AlignDistil``, ``reward_boost_type="aligndistil"``):

        z*_t = z^dpo_t + w_t (z^dpo_t - z^rdpo_t),     w_t = beta2 * sum_v |pi^dpo_t(v) - pi^rdpo_t(v)| + eps

    dpo_logits, reverse_logits: (..., V) next-token logits of the DPO and the reverse-DPO model (trained on the same
    pairs with chosen and rejected swapped). -> (z* (..., V), w (...)). Both are constants (no gradient).

    w_t is the official code's ``tvd * beta2 + 1e-3`` where ``tvd`` is the L1 distance sum_v |p - q|, i.e. twice
    the usual total-variation distance; the project follows the code (``beta2 = 10`` is tuned for it). The
    extrapolation is against the reverse-DPO model, not the reference: the reference model plays no part.
    """
    if dpo_logits.shape != reverse_logits.shape:
        raise InputError(f"DPO logits {tuple(dpo_logits.shape)} and reverse-DPO logits "
                         f"{tuple(reverse_logits.shape)} must have the same (..., V) shape (one tokenizer)")
    if beta2 < 0 or eps <= 0:
        raise InputError(f"aligndistil needs beta2 >= 0 and eps > 0 (w_t = beta2 * TV + eps divides beta), got "
                         f"beta2={beta2}, eps={eps}")
    with torch.no_grad():
        dtype = torch.promote_types(dpo_logits.dtype, torch.float32)
        z_dpo, z_rev = dpo_logits.to(dtype), reverse_logits.to(dtype)
        distance = (torch.softmax(z_dpo, -1) - torch.softmax(z_rev, -1)).abs().sum(-1)  # (...)
        weight = beta2 * distance + eps
        teacher = z_dpo + weight.unsqueeze(-1) * (z_dpo - z_rev)
    return teacher, weight


def _distill(
    name: str,
    logits: Tensor | None,
    dpo_logits: Tensor | None,
    reverse_logits: Tensor | None,
    ref_logits: Tensor | None,
    mask: Tensor,
    *,
    beta: float,
    beta2: float,
    eps: float,
    temperature: float,
    length_normalize: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence loss sum_t m_t (beta / w_t) KL(pi_theta(.|s_t) || softmax(z*_t / tau)) (/ L when normalised).
    -> (loss (B,), per-token KL (B, T) detached, w (B, T))."""
    if logits is None:
        raise InputError(f"aligndistil needs the policy's full-vocabulary logits {name}_logits (B, T, V); the "
                         "preference learner passes them for losses registered with needs_logits")
    if dpo_logits is None and reverse_logits is None:
        if ref_logits is None:
            raise InputError(f"aligndistil needs {name}_dpo_logits and {name}_reverse_logits (B, T, V): the logits "
                             "of the DPO and the reverse-DPO model (credit module contrastive_dpo loads them)")
        dpo_logits = reverse_logits = ref_logits  # both auxiliary models are the reference (recipes' "base")
    if dpo_logits is None or reverse_logits is None:
        raise InputError(f"aligndistil needs both {name}_dpo_logits and {name}_reverse_logits, got only one")
    if logits.shape[:-1] != mask.shape or dpo_logits.shape != logits.shape:
        raise InputError(f"aligndistil: {name}_logits {tuple(logits.shape)} and {name}_dpo_logits "
                         f"{tuple(dpo_logits.shape)} must both be (B, T, V) matching {name}_mask {tuple(mask.shape)}")
    teacher, weight = aligndistil_teacher(dpo_logits, reverse_logits, beta2=beta2, eps=eps)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = torch.log_softmax(logits.to(dtype), -1)  # (B, T, V)
    log_q = torch.log_softmax(teacher.to(dtype) / temperature, -1)  # (B, T, V) constant
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T) reverse KL, student first
    per_token = masked_fill_zero((beta / weight.to(dtype)) * kl, mask)
    loss = per_token.sum(-1)
    if length_normalize:
        loss = loss / sequence_lengths(mask).to(dtype).clamp(min=1)
    return loss, kl.detach(), weight


@PREFERENCE_LOSSES.register("aligndistil", reference=False, needs_logits=True)
def aligndistil(
    x: PreferenceInputs,
    *,
    beta: float = 0.1,
    beta2: float = 10.0,
    temperature: float = 1.0,
    eps: float = 1e-3,
    length_normalize: bool = True,
    responses: str = "both",
    chosen_logits: Tensor | None = None,
    rejected_logits: Tensor | None = None,
    ref_chosen_logits: Tensor | None = None,
    ref_rejected_logits: Tensor | None = None,
    chosen_dpo_logits: Tensor | None = None,
    chosen_reverse_logits: Tensor | None = None,
    rejected_dpo_logits: Tensor | None = None,
    rejected_reverse_logits: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """AlignDistil, off-policy (Zhang et al., ACL 2025, arXiv 2503.02832): token-level distillation of the policy
    toward an adaptive teacher built from a DPO and a reverse-DPO model (:func:`aligndistil_teacher`):

        loss(y) = sum_t m_t (beta / w_t) KL(pi_theta(.|s_t) || softmax(z*_t / tau))   (/ L_y if length_normalize)

    per pair: the mean of loss(y_w) and loss(y_l) (``responses="both"``) or loss(y_w) alone (``"chosen"``). The
    policy logits ``chosen_logits`` (B, Tc, V) / ``rejected_logits`` (B, Tr, V) come from the learner; the
    auxiliary logits ``{chosen,rejected}_{dpo,reverse}_logits`` (same shapes) from credit module
    ``contrastive_dpo``'s models. Without both auxiliary logits the reference's are used for both (the teacher is
    then pi_ref and w_t = eps: what the recipes' default ``base`` for both models gives). -> (B,).

    Checked against the official code (the paper body was not readable here; its abstract and Figure 1 confirm a
    teacher extrapolated between a DPO and a reverse-DPO model with a per-token weight): the KL is reverse
    (student first, ``kd_divergence=rkl``); w_t enters twice, as the extrapolation weight of the teacher and in the
    per-token coefficient beta / w_t; the teacher uses the reverse-DPO model in place of the reference, which is
    not needed at all; z* is divided by the temperature (``kd_temperature``, 1), the policy's logits are not;
    defaults beta = 0.1, beta2 = 10, length normalisation on (the authors' script: ``--reward_len_norm``).
    Decisions: the official off-policy trainer distils on the chosen responses only (``responses="chosen"``);
    the default ``"both"`` also distils on the rejected ones, whose states are as valid for a token-level teacher.
    The distribution at position t is the one that predicts response token t (the official code's label mask is
    shifted by one position against its logits; this is not reproduced). Memory: the auxiliary logits travel
    with the batch, two (B, T, V) tensors per response.

    Stats ``rewards/*`` are reference-free: the policy's length-normalised log-likelihood times beta (as SimPO's),
    so ``rewards/accuracy`` is the share of pairs whose chosen response is more likely per token.
    """
    if responses not in ALIGNDISTIL_RESPONSES:
        raise InputError(f"aligndistil responses must be one of {', '.join(ALIGNDISTIL_RESPONSES)}, got "
                         f"{responses!r}")
    if beta <= 0 or temperature <= 0:
        raise InputError(f"aligndistil needs beta > 0 and temperature > 0, got beta={beta}, "
                         f"temperature={temperature}")
    common: dict[str, Any] = {"beta": beta, "beta2": beta2, "eps": eps, "temperature": temperature,
              "length_normalize": length_normalize}
    loss_w, kl_w, weight_w = _distill("chosen", chosen_logits, chosen_dpo_logits, chosen_reverse_logits,
                                      ref_chosen_logits, x.chosen_mask, **common)
    loss = loss_w
    tokens = (x.chosen_mask != 0).sum().clamp(min=1)
    kl_sum, weight_sum = masked_sum(kl_w, x.chosen_mask), masked_sum(weight_w.to(kl_w.dtype), x.chosen_mask)
    if responses == "both":
        loss_l, kl_l, weight_l = _distill("rejected", rejected_logits, rejected_dpo_logits, rejected_reverse_logits,
                                          ref_rejected_logits, x.rejected_mask, **common)
        loss = 0.5 * (loss_w + loss_l)
        tokens = tokens + (x.rejected_mask != 0).sum()
        kl_sum = kl_sum + masked_sum(kl_l, x.rejected_mask)
        weight_sum = weight_sum + masked_sum(weight_l.to(kl_l.dtype), x.rejected_mask)
    reward_w = beta * masked_sum(x.chosen_logp, x.chosen_mask, -1) / sequence_lengths(x.chosen_mask).clamp(min=1)
    reward_l = beta * masked_sum(x.rejected_logp, x.rejected_mask, -1) / sequence_lengths(x.rejected_mask).clamp(
        min=1)
    stats = _pair_stats(reward_w, reward_l)
    stats["aligndistil/kl_to_teacher"] = (kl_sum / tokens).detach()
    stats["aligndistil/teacher_weight"] = (weight_sum / tokens).detach()
    return loss, stats
