"""Implicit token rewards from a DPO-trained model (the r-to-Q* view)."""

from __future__ import annotations

from torch import Tensor

from rewards.credit.base import CreditInputs, TokenLogProbModel, register_credit, response_logprobs
from rewards.credit.outcome import terminal_rewards


@register_credit("implicit_dpo", output="rewards", level="token_rewards")
def implicit_dpo(
    x: CreditInputs,
    *,
    dpo_model: TokenLogProbModel,
    ref_model: TokenLogProbModel,
    beta: float = 0.1,
    clip: float | None = None,
    outcome_weight: float = 1.0,
) -> Tensor:
    """r_t = beta (log pi_dpo(y_t) - log pi_ref(y_t)) (Rafailov et al. 2024, "From r to Q*", arXiv 2404.12358 §4),
    plus ``outcome_weight`` * R_i on the last token.

    The per-token implicit reward equals the true reward up to potential-based shaping, so it redistributes credit
    without changing which policy is optimal. ``clip`` bounds |r_t| after scaling, as RTO (arXiv 2404.18922),
    whose defaults are beta = 0.05, clip = 0.05. ``outcome_weight = 0`` keeps only the implicit reward.
    """
    shaped = beta * (response_logprobs(dpo_model, x) - response_logprobs(ref_model, x))
    if clip is not None:
        shaped = shaped.clamp(-clip, clip)
    return shaped * x.float_mask + outcome_weight * terminal_rewards(x)
