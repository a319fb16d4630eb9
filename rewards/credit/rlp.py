"""RLP: the information-gain reward of a chain of thought (Hatamizadeh et al. 2025, "RLP: Reinforcement as a
Pretraining Objective", arXiv 2510.01265).

Confirmed from the paper (§2, Algorithm 1) [P]:

* reasoned scorer S_pred(c_t) = log p_theta(x_t | x_<t, c_t) (eq. 3), the *same* network that sampled the thought
  c_t, scored with teacher forcing and no gradient;
* no-think baseline S_ema = log p_phi(x_t | x_<t) (eq. 4), an EMA teacher of the policy (phi <- tau phi +
  (1 - tau) theta after every optimiser step, tau = 0.999, lazily initialised to theta);
* reward r(c_t) = S_pred(c_t) - S_ema (eq. 5), a constant for the update;
* advantage A_i = G/(G-1) (r_i - mean_j r_j) over the G thoughts of one context (eq. 7): the ``rloo`` estimator;
* clipped surrogate on the thought tokens only, 1/|c| sum over a thought's tokens then 1/(BG) over thoughts (eq. 8):
  ``ppo_clip`` with the ``seq_mean_token_mean`` reducer; no KL (beta = 0, §10), G = 16, temperature 0.7 (§9).

Decisions here [U]:

* x is a multi-token continuation, the row's reference answer (the data's ``answer`` column, tokenised alone, as
  ``exact_match`` reads it), not one next token. ``reduce="sum"`` (default) scores its whole log-likelihood,
  log p(x | .) = sum_k log p(x_k | ., x_<k), the chain-rule extension of eq. 3-5; ``"mean"`` divides both scores
  by |x| (the per-token average that the paper's sequence-level identity, Appendix 8.1, averages).
* The thought is the completion as sampled: its tokens up to its last trainable one (EOS included, non-trainable
  holes such as tool output included, padding excluded), appended to the prompt; the target follows it.
* The baseline is a scorer model, by default the frozen base model (``"base"``), not an EMA. Under a group-relative
  estimator (``rloo``, ``grpo``, ``dr_grpo``) S_ema is the same for every thought of a prompt and cancels, so the
  choice changes the logged reward but not the update; only an estimator without a group baseline sees it.
* The reasoned scorer defaults to ``"policy"``: the learner's current weights (both runtimes serve it through
  ``Learner.logprobs``, at the learner's temperature, i.e. ``rollout.temperature``; keep it 1 for the untempered
  p_theta). Scoring happens before the step's update, so theta is the policy that sampled the thought, except
  under ``runtime.overlap``: there the rollout was sampled one weight version earlier, and S_pred is scored with
  the newer weights (a departure from eq. 3 of one version, as for every other quantity of an overlapped step).
* The sequence reward is spread uniformly over the thought's trainable tokens (each gets R_i / L_i, the row sums to
  R_i), so the module is of kind ``sequence``: RLP's reward is one scalar per thought (eq. 8 broadcasts A_i).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from align.errors import InputError
from align.ops import check_finite, sequence_lengths
from rewards.credit.base import CreditInputs, TokenLogProbModel, register_credit


def _packed_context(x: CreditInputs, *, with_thought: bool) -> tuple[Tensor, Tensor]:
    """The prompt's real tokens, then (``with_thought``) the completion up to its last trainable token, left-padded
    into one block. -> (ids (B, P+T), mask (B, P+T) long)."""
    assert x.prompt_ids is not None
    prompt_mask = torch.ones_like(x.prompt_ids) if x.prompt_mask is None else (x.prompt_mask != 0).long()
    trainable = (x.mask != 0).long()
    up_to_last = trainable.flip(-1).cumsum(-1).flip(-1) > 0  # (B, T): at or before the last trainable token
    thought = up_to_last.long() if with_thought else torch.zeros_like(trainable)
    ids = torch.cat([x.prompt_ids, x.token_ids], 1)
    valid = torch.cat([prompt_mask, thought], 1)
    order = torch.sort(valid, dim=1, stable=True).indices  # invalid positions first, valid ones after, in order
    return ids.gather(1, order), valid.gather(1, order)


def target_logprobs(model: TokenLogProbModel, context_ids: Tensor, context_mask: Tensor, target_ids: Tensor,
                    target_mask: Tensor) -> Tensor:
    """log p(target_k | context, target_<k) under ``model``, teacher-forced. context: (B, C) left-padded; target:
    (B, X) right-padded. -> (B, X), 0 where ``target_mask`` is 0."""
    if not isinstance(model, TokenLogProbModel):
        raise InputError(f"rlp_information_gain scores with models that provide token_logprobs(input_ids, "
                         f"attention_mask); got {type(model).__name__} (in a recipe, name one: policy, base or a "
                         "model directory)")
    ids = torch.cat([context_ids, target_ids], 1)
    mask = torch.cat([context_mask, torch.ones_like(target_ids)], 1)  # right padding is causal-invisible
    out = model.token_logprobs(ids, mask)
    if out.shape != ids.shape:
        raise InputError(f"token_logprobs returned {tuple(out.shape)}, expected (B, S) = {tuple(ids.shape)}")
    target = out[:, -target_ids.shape[1] :]
    check_finite("target log-probs", target, target_mask)
    return torch.where(target_mask != 0, target, torch.zeros((), dtype=target.dtype))


def information_gain(x: CreditInputs, policy_model: TokenLogProbModel, baseline_model: TokenLogProbModel, *,
                     reduce: Literal["sum", "mean"] = "sum") -> Tensor:
    """r_i = log p_policy(x_i | prompt_i, c_i) - log p_baseline(x_i | prompt_i) (arXiv 2510.01265 eq. 3-5), x the
    row's target and c its completion; ``reduce="mean"`` divides both terms by |x_i|. -> (B,) in ``x.dtype``."""
    x.require("rlp_information_gain", "prompt_ids", "target_ids")
    assert x.target_ids is not None and x.target_mask is not None
    if reduce not in ("sum", "mean"):
        raise InputError(f"reduce must be 'sum' (log-likelihood of the whole target) or 'mean' (per target token), "
                         f"got {reduce!r}")
    lengths = (x.target_mask != 0).sum(-1)  # (B,)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0])
        raise InputError(f"rlp_information_gain needs a non-empty reference answer on every row; row {row} has none "
                         "(drop rows with an empty answer column)")
    scores = []
    for model, with_thought in ((policy_model, True), (baseline_model, False)):
        context_ids, context_mask = _packed_context(x, with_thought=with_thought)
        scores.append(target_logprobs(model, context_ids, context_mask, x.target_ids, x.target_mask)
                      .to(x.dtype).sum(-1))
    gain = scores[0] - scores[1]
    return gain / lengths.to(x.dtype) if reduce == "mean" else gain


@register_credit("rlp_information_gain", output="rewards", level="sequence")
def rlp_information_gain(
    x: CreditInputs,
    *,
    policy_model: TokenLogProbModel | str = "policy",
    baseline_model: TokenLogProbModel | str = "base",
    reduce: Literal["sum", "mean"] = "sum",
    outcome_weight: float = 0.0,
) -> Tensor:
    """RLP's information-gain reward of each completion as a thought (arXiv 2510.01265 eq. 5, module docstring),
    plus ``outcome_weight`` * R_i (the recipe's rewards; 0 by default: RLP is verifier-free), spread uniformly
    over the completion's trainable tokens: (r_i + w R_i) / L_i on each, the row sums to r_i + w R_i. -> (B, T).

    ``policy_model`` scores prompt + completion + target (default ``"policy"``, the current weights);
    ``baseline_model`` scores prompt + target (default ``"base"``). Needs ``prompt_ids`` and ``target_ids``.
    """
    gain = information_gain(x, policy_model, baseline_model, reduce=reduce)  # type: ignore[arg-type]
    total = gain + outcome_weight * x.rewards.to(x.dtype)
    lengths = sequence_lengths(x.mask).to(x.dtype).clamp(min=1)
    return (total / lengths).unsqueeze(-1) * x.float_mask
