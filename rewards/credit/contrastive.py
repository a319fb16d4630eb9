"""Critical-token weights from a positive and a negative model (cDPO, "Critical Tokens Matter")."""

from __future__ import annotations

import torch
from torch import Tensor

from align.advantages import group_baseline
from align.ops import last_token_mask, selective_log_softmax
from rewards.credit.base import (
    CreditInputs,
    LogitsModel,
    TokenLogProbModel,
    register_credit,
    response_logits,
    response_logprobs,
)


def contrastive_scores(x: CreditInputs, positive: TokenLogProbModel, negative: TokenLogProbModel, lam: float) -> Tensor:
    """s_t = softmax((1 + lam) z+ - lam z-)[y_t] in [0, 1] (arXiv 2411.19943; the authors' code uses lam = 1).

    With models that expose full logits (:class:`LogitsModel`) this is exact. With log-probs only, the normaliser is
    not available and s_t = min(1, exp((1 + lam) log p+ - lam log p-)) is used instead (stated departure). (B, T).
    """
    if isinstance(positive, LogitsModel) and isinstance(negative, LogitsModel):
        combined = (1 + lam) * response_logits(positive, x) - lam * response_logits(negative, x)
        return selective_log_softmax(combined, x.token_ids).exp().to(x.dtype)
    log_s = (1 + lam) * response_logprobs(positive, x) - lam * response_logprobs(negative, x)
    return log_s.clamp(max=0.0).exp()


@register_credit("contrastive_critical", output="weights", level="token_weights")
def contrastive_critical(
    x: CreditInputs,
    *,
    positive_model: TokenLogProbModel,
    negative_model: TokenLogProbModel,
    lam: float = 1.0,
    only_negative: bool = True,
    eos_token_id: int | None = None,
) -> Tensor:
    """cDPO-style token weights (Lin et al., arXiv 2411.19943; spec §6): a completion whose reward is below its
    group's mean is "negative" and gets w_t = 1 - s_t, so tokens the contrastive model finds unlikely (critical
    tokens) carry the blame; other completions get 1 (``only_negative``, the authors' default) or s_t.

    The EOS token gets weight 1 in every completion, as in the authors' code (``Critical-Tokens-Matter``,
    ``train_cdpo.py``: the scores cover the response text, and the EOS the DPO tokenisation appends gets a fixed
    1 on both sides, 1 - 0 on the rejected one). The EOS is found from the mask: the row's last trainable token.
    ``eos_token_id=None`` (default) takes that token as the EOS, which holds for every preference pair (the pair
    builder appends EOS, as TRL) and every completion that finished; with the tokenizer's id, only a last token
    equal to it counts, so a truncated completion keeps the score of its last token. (B, T).
    """
    scores = contrastive_scores(x, positive_model, negative_model, lam)
    mean, _ = group_baseline(x.rewards.to(x.dtype), x.group_ids, ddof=0)
    negative = (x.rewards.to(x.dtype) < mean).unsqueeze(-1)
    positive_weight = torch.ones_like(scores) if only_negative else scores
    weights = torch.where(negative, 1.0 - scores, positive_weight)
    eos = last_token_mask(x.mask)  # (B, T)
    if eos_token_id is not None:
        eos = eos & (x.token_ids == eos_token_id)
    return torch.where(eos, torch.ones_like(weights), weights) * x.float_mask
