"""Macro actions (MA-RLHF, Chai et al., ICLR 2025, arXiv 2410.02743; code ``ernie-research/MA-RLHF``): credit per
segment of tokens (spec §7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from align.errors import InputError
from rewards.credit.base import CreditInputs, TokenLogProbModel, register_credit, response_logprobs
from rewards.credit.outcome import terminal_rewards, uniform

SEGMENTERS = ("ngram", "delimiter", "perplexity")
SIGMAS = ("equal", "unit", "position", "sum")
PLACEMENTS = ("terminal", "uniform")
Sigma = Literal["equal", "unit", "position", "sum"]
Placement = Literal["terminal", "uniform"]


def _next_trainable(values: Tensor, valid: Tensor) -> Tensor:
    """(B, T): at each position, ``values`` at the row's next trainable position (-inf after the last one)."""
    following = torch.full_like(values, float("-inf"))
    running = torch.full_like(values[:, 0], float("-inf"))
    for t in range(values.shape[1] - 1, -1, -1):
        following[:, t] = running
        running = torch.where(valid[:, t], values[:, t], running)
    return following


def segment_ends(
    x: CreditInputs, segmenter: str, n: int, delimiter_ids: Sequence[int], ref_logp: Tensor | None = None
) -> Tensor:
    """(B, T) bool: True at the last trainable token of each macro action. Positions count trainable tokens only.

    ``ngram``: after every n trainable tokens (the authors' ``--ngram``; their scripts use 5, n = 1 is token-level
    PPO); ``delimiter``: at each token in ``delimiter_ids`` (e.g. newline and punctuation ids);
    ``perplexity``: MA-RLHF's rule, a new macro action starts at token k whenever the per-token perplexity under
    the *reference* model rises from k to k + 1 (ppl_{k+1} > ppl_k), so token k - 1 ends one; ``ref_logp`` (B, T)
    holds the reference log-probs (perplexity exp(-log p) rises exactly where -log p does).
    Every segmenter: the last trainable token is a macro action of its own (MA-RLHF's final length-1 macro action,
    which carries the outcome reward), so the token before it also ends one.
    """
    valid = x.mask != 0
    index = valid.long().cumsum(-1)  # 1-based index among trainable tokens
    count = index.max(-1, keepdim=True).values  # (B, 1) trainable tokens per row
    if segmenter == "ngram":
        if n < 1:
            raise InputError(f"macro_action n must be >= 1, got {n}")
        ends = valid & (index % n == 0)
    elif segmenter == "delimiter":
        ends = valid & torch.isin(x.token_ids, torch.tensor(list(delimiter_ids), dtype=x.token_ids.dtype))
    elif segmenter == "perplexity":
        if ref_logp is None:
            raise InputError("macro_action(segmenter='perplexity') needs the reference log-probs (ref_model)")
        surprisal = -ref_logp  # (B, T)
        after = _next_trainable(surprisal, valid)  # -log p of the next trainable token, k + 1
        after_next = _next_trainable(after, valid)  # of the one after it, k + 2
        ends = valid & (after_next > after)  # ppl rises from k + 1 to k + 2: k + 1 starts a macro action
    else:
        raise InputError(f"macro_action segmenter must be one of {', '.join(SEGMENTERS)}, got {segmenter!r}")
    last = valid & (index == count)
    before_last = valid & (index == count - 1)
    return ends | before_last | last


def _sigma(ends: Tensor, valid: Tensor, segment: Tensor, sizes: Tensor, sigma: str) -> Tensor:
    """(T,) weights sigma_t of one row's tokens inside their macro action (0 off the mask).

    ends, valid: (T,) bool; segment: (T,) segment id of each position; sizes: (K,) trainable tokens per segment.
    """
    dtype = sizes.dtype
    zero = torch.zeros((), dtype=dtype)
    if sigma == "sum":
        return valid.to(dtype)
    if sigma == "equal":
        return torch.where(valid, 1.0 / sizes[segment].clamp(min=1), zero)
    if sigma == "unit":
        return ends.to(dtype)
    # "position": sigma_t proportional to 1 / (position of t inside its macro action), normalised
    index = valid.long().cumsum(-1)
    tokens_before = sizes.flip(0).cumsum(0).flip(0) - sizes  # trainable tokens in later ids = earlier segments
    position = (index - tokens_before[segment].long()).clamp(min=1).to(dtype)
    raw = torch.where(valid, 1.0 / position, zero)
    norm = torch.zeros_like(sizes).index_add_(0, segment, raw)
    return raw / norm[segment].clamp(min=1e-12)


@register_credit("macro_action", output="rewards", level="token_rewards")
def macro_action(
    x: CreditInputs,
    *,
    segmenter: str = "ngram",
    n: int = 5,
    delimiter_ids: Sequence[int] = (),
    sigma: Sigma = "equal",
    outcome_placement: Placement = "terminal",
    ref_model: TokenLogProbModel | None = None,
) -> Tensor:
    """MA-RLHF macro rewards R_k = sum_{t in omega_k} sigma_t r_t (arXiv 2410.02743 §3; the authors'
    ``modeling_macro_action``), each placed on the last token of its macro action omega_k, so that every token of
    omega_k sees the same reward-to-go, hence the same advantage ("every token of omega_k gets A_k").

    Token rewards r_t: the outcome R_i plus any dense ``token_rewards`` (e.g. -beta KL). ``outcome_placement``:
    ``"terminal"`` (default; MA-RLHF, as PPO: R_i on the last trainable token, which is its own length-1 macro
    action, so R_K = R_i whatever sigma) or ``"uniform"`` (R_i / L_i on every token: this module's former
    default, not MA-RLHF's). ``sigma`` (spec §7): ``"equal"`` (default, the authors' ``--value_function equal``:
    sigma_t = 1/|omega_k|, the macro reward is the *mean* of its token rewards), ``"unit"`` (the last token's),
    ``"position"`` (sigma_t proportional to 1/position in omega_k, normalised), or ``"sum"`` (sigma_t = 1: not
    MA-RLHF; rows then sum to R_i + sum_t token_rewards, which with ``"uniform"`` is the former behaviour).
    Segmenters: :func:`segment_ends`; ``"perplexity"`` needs ``ref_model`` (a :class:`TokenLogProbModel`, in a
    recipe ``ref_model: base``): the authors measure perplexity under the reference model, not the policy.

    Example (n = 2, L = 4): macro actions {0, 1}, {2}, {3}; r = (d_0, d_1, d_2, d_3 + R) gives
    (0, (d_0 + d_1)/2, d_2, d_3 + R) with sigma "equal".
    Departure: MA-RLHF runs GAE over macro steps with a critic; here the segments shape token rewards for any
    token-level estimator (``dense_group``, ``reinforce_pp``, ``gae``), with or without a critic. (B, T).
    """
    if sigma not in SIGMAS:
        raise InputError(f"macro_action sigma must be one of {', '.join(SIGMAS)}, got {sigma!r}")
    if outcome_placement not in PLACEMENTS:
        raise InputError(f"macro_action outcome_placement must be 'terminal' (MA-RLHF) or 'uniform', got "
                         f"{outcome_placement!r}")
    ref_logp = None
    if segmenter == "perplexity":
        if ref_model is None:
            raise InputError("macro_action(segmenter='perplexity') measures perplexity under the reference model, "
                             "as MA-RLHF: pass ref_model=<model with token_logprobs> (in a recipe: ref_model: base)")
        ref_logp = response_logprobs(ref_model, x)
    rewards = terminal_rewards(x, include_dense=False) if outcome_placement == "terminal" else uniform(x)
    if x.token_rewards is not None:
        rewards = rewards + x.token_rewards.to(x.dtype) * x.float_mask
    valid = x.mask != 0
    ends = segment_ends(x, segmenter, n, delimiter_ids, ref_logp)
    segment = torch.flip(torch.flip(ends.long(), [-1]).cumsum(-1), [-1])  # (B, T) same id for a segment's tokens
    out = torch.zeros_like(rewards)
    zero = torch.zeros((), dtype=rewards.dtype)
    for i in range(rewards.shape[0]):  # each row: weight its tokens, total each segment onto its end token
        k = int(segment[i].max()) + 1
        sizes = torch.zeros(k, dtype=rewards.dtype).index_add_(0, segment[i], valid[i].to(rewards.dtype))
        weights = _sigma(ends[i], valid[i], segment[i], sizes, sigma)
        totals = torch.zeros(k, dtype=rewards.dtype).index_add_(0, segment[i], weights * rewards[i])
        out[i] = torch.where(ends[i], totals[segment[i]], zero)
    return out
