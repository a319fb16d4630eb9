"""AlignDistil's contrastive DPO reward: a DPO model against a reverse-DPO model (arXiv 2503.02832).

The preference loss ``aligndistil`` reads this module's two models (``dpo_model``, ``reverse_dpo_model``) and
distils toward a teacher built from their full logits; as a credit module on its own, it gives the sampled tokens'
contrastive reward. Shapes: B completions, T response tokens.
"""

from __future__ import annotations

from torch import Tensor

from rewards.credit.base import CreditInputs, TokenLogProbModel, register_credit, response_logprobs
from rewards.credit.outcome import terminal_rewards


@register_credit("contrastive_dpo", output="rewards", level="token_rewards")
def contrastive_dpo(
    x: CreditInputs,
    *,
    dpo_model: TokenLogProbModel,
    reverse_dpo_model: TokenLogProbModel,
    beta: float = 0.1,
    outcome_weight: float = 1.0,
) -> Tensor:
    """r_t = beta (log pi_dpo(y_t) - log pi_rdpo(y_t)) (AlignDistil's contrastive DPO reward, arXiv 2503.02832: the
    reference of the implicit reward beta log pi_dpo / pi_ref replaced by a DPO model trained on the swapped pairs),
    plus ``outcome_weight`` * R_i on the last token. (B, T).

    With ``aligndistil`` its beta is the loss's beta (one beta, as the official code's ``args.beta``).
    """
    shaped = beta * (response_logprobs(dpo_model, x) - response_logprobs(reverse_dpo_model, x))
    return shaped * x.float_mask + outcome_weight * terminal_rewards(x)
