"""Macro actions (MA-RLHF, Chai et al., ICLR 2025, arXiv 2410.02743): credit per segment of tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from align.errors import InputError
from rewards.credit.base import CreditInputs, register_credit
from rewards.credit.outcome import terminal_rewards, uniform

SEGMENTERS = ("ngram", "delimiter", "perplexity")


def segment_ends(x: CreditInputs, segmenter: str, n: int, delimiter_ids: Sequence[int]) -> Tensor:
    """(B, T) bool: True at the last trainable token of each macro action.

    ``ngram``: every n trainable tokens (the authors' scripts use n = 5; n = 1 is vanilla token-level PPO);
    ``delimiter``: at each token in ``delimiter_ids`` (e.g. newline and punctuation ids);
    ``perplexity``: before each token whose surprisal -log p exceeds the previous token's (a boundary wherever the
    per-token perplexity rises; needs ``logp``). The last trainable token always ends a segment.
    """
    valid = x.mask != 0
    index = valid.long().cumsum(-1)  # 1-based index among trainable tokens
    if segmenter == "ngram":
        if n < 1:
            raise InputError(f"macro_action n must be >= 1, got {n}")
        ends = valid & (index % n == 0)
    elif segmenter == "delimiter":
        ends = valid & torch.isin(x.token_ids, torch.tensor(list(delimiter_ids), dtype=x.token_ids.dtype))
    elif segmenter == "perplexity":
        x.require("macro_action(perplexity)", "logp")
        assert x.logp is not None
        surprisal = -x.logp
        ends = torch.zeros_like(valid)
        # token t ends a segment when the next trainable token is more surprising than t
        following = torch.full_like(surprisal, float("-inf"))
        running = torch.full_like(surprisal[:, 0], float("-inf"))
        for t in range(surprisal.shape[1] - 1, -1, -1):
            following[:, t] = running
            running = torch.where(valid[:, t], surprisal[:, t], running)
        ends = valid & (following > surprisal)
    else:
        raise InputError(f"macro_action segmenter must be one of {', '.join(SEGMENTERS)}, got {segmenter!r}")
    last = valid & (index == index.max(-1, keepdim=True).values)
    return ends | last


@register_credit("macro_action", output="rewards", level="token_rewards")
def macro_action(
    x: CreditInputs,
    *,
    segmenter: str = "ngram",
    n: int = 5,
    delimiter_ids: Sequence[int] = (),
    base: str = "uniform",
) -> Tensor:
    """Token rewards summed per macro action and placed on its last token, so every token of a segment sees the
    same reward-to-go, hence the same advantage (MA-RLHF's "every token of omega_k gets A_k").

    ``base`` is the token credit being grouped: ``"uniform"`` (R_i / L_i per token, so segment k gets
    R_i * |omega_k| / L_i) or ``"last_token"`` (R_i at the end). Dense ``token_rewards`` (e.g. -KL) are added to
    the base and aggregated with sigma = "equal", the authors' default. Rows sum to R_i (+ dense rewards).
    Departure: MA-RLHF runs GAE over macro steps with a critic; here the segments shape rewards for any
    token-level estimator, without a critic.
    """
    if base not in ("uniform", "last_token"):
        raise InputError(f"macro_action base must be 'uniform' or 'last_token', got {base!r}")
    rewards = uniform(x) if base == "uniform" else terminal_rewards(x, include_dense=False)
    if x.token_rewards is not None:
        rewards = rewards + x.token_rewards.to(x.dtype) * x.float_mask
    ends = segment_ends(x, segmenter, n, delimiter_ids)
    segment = torch.flip(torch.flip(ends.long(), [-1]).cumsum(-1), [-1])  # same id for a segment's tokens
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):  # scatter each segment's total onto its end token
        totals = torch.zeros(int(segment[i].max()) + 1, dtype=rewards.dtype).index_add_(0, segment[i], rewards[i])
        out[i] = torch.where(ends[i], totals[segment[i]], torch.zeros((), dtype=rewards.dtype))
    return out
