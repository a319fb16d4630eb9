"""Long Horizon Temperature Scaling (LHTS) at sampling time, by sampling-importance-resampling (SIR).

Shih, Sadigh & Ermon, "Long Horizon Temperature Scaling", ICML 2023, arXiv 2302.03686 §3: the target is the
*sequence-level* tempered distribution

    p_T(y | x) = p(y | x)^(1/T) / Z_T(x),    Z_T(x) = sum_y p(y | x)^(1/T),

which per-token temperature (dividing each next-token logit by T) does not produce: renormalising every conditional
separately is myopic (the paper's §2). The paper amortises p_T by fine-tuning a model q_T on importance-weighted
samples of p (minimising KL(p_T || q_T)). **Departure from the paper:** nothing is fine-tuned here. Each step the
engine draws k candidates per requested sample at temperature 1 (the proposal p itself); each candidate gets the
importance weight p_T / p, proportional to

    w_j = exp((1/T - 1) * log p(y_j | x)),   log p(y_j | x) = sum_t logp_{j,t} over the candidate's tokens,

self-normalised over the prompt's pool of G*k candidates; then G completions are drawn from the pool **with
replacement, by multinomial resampling** (decision: the G draws are i.i.d. given the pool, so each chosen completion
on its own follows the SIR distribution, which tends to p_T as k grows; systematic resampling would lower the
variance of the counts but correlates the draws). A completion that hit ``max_new_tokens`` is weighted by the
probability of its prefix: the target is then p_T over the truncated outcomes, as the proposal is p over them.

The effective sample size of each prompt's pool, ESS = 1 / sum_j w_j^2 (normalised w, 1 <= ESS <= G*k), says how
many candidates carried the choice: near 1 the resampled group is copies of one completion.

What the learner sees: the chosen rows keep the engine's temperature-1 log-probs as ``logp`` (pi_old), and the
learner scores at ``rollout.temperature``, which the recipe holds at 1 with this option; so the PPO ratio
pi_theta / pi_old starts at exactly 1 and measures parameter drift, and with ``runtime.overlap`` the truncated
importance weight min(pi_learner / pi_rollout, cap) corrects for the stale weights as usual. The rows follow
p_old^(1/T) / Z rather than p_old, and nothing corrects for that: the update is A(y) grad log pi_theta(y) averaged
over the tempered distribution (deliberately; weighting by p / p^(1/T) would undo the tempering). The per-token
temperature of this repository is different: there the learner scores at T too, so it trains the tempered policy.

Shapes: B candidate rows (prompts x G*k), T response tokens, n prompts, G chosen per prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from align.errors import InputError
from align.ops import masked_sum
from align.trainers.protocols import Rollout

_SALT = 0x9E3779B97F4A7C15  # resampling draws from seed ^ salt: a stream apart from the engine's own (seed)


def sequence_logprob(logp: Tensor, mask: Tensor) -> Tensor:
    """log p(y | x) = sum_t logp_t over the trainable tokens. logp, mask: (B, T) -> (B,)."""
    return masked_sum(logp, mask, dim=-1)


def _group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(the distinct group ids in ascending order (n,), each row's position among them (B,))."""
    groups, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
    return groups, inverse


def tempered_log_weights(seq_logp: Tensor, group_ids: Tensor, *, temperature: float) -> Tensor:
    """Self-normalised log importance weights of p^(1/T) against the proposal p (arXiv 2302.03686 §3).

    log w_j = (1/T - 1) log p(y_j) - logsumexp_{i in group(j)} (1/T - 1) log p(y_i), so that exp(log w) sums to 1
    within every group. seq_logp: (B,) float; group_ids: (B,) long. -> (B,) in seq_logp's dtype (at least float32).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"long-horizon temperature must be a finite number > 0, got {temperature}")
    if seq_logp.dim() != 1 or group_ids.shape != seq_logp.shape:
        raise InputError(f"seq_logp and group_ids must both be (B,), got {tuple(seq_logp.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if not bool(torch.isfinite(seq_logp).all()):
        raise InputError("long-horizon resampling needs finite sequence log-probs; the engine returned NaN or inf "
                         "(a token sampled with probability 0?)")
    dtype = seq_logp.dtype if seq_logp.dtype == torch.float64 else torch.float32
    unnormalised = (1.0 / temperature - 1.0) * seq_logp.to(dtype)  # (B,)
    groups, inverse = _group_index(group_ids)
    peak = torch.full((len(groups),), -math.inf, dtype=dtype).scatter_reduce(0, inverse, unnormalised, "amax")
    total = torch.zeros(len(groups), dtype=dtype).index_add(0, inverse, (unnormalised - peak[inverse]).exp())
    return unnormalised - (peak + total.log())[inverse]


def effective_sample_size(log_weights: Tensor, group_ids: Tensor) -> Tensor:
    """Kish's ESS per group, 1 / sum_j w_j^2 with w normalised in the group. -> (n,), groups in ascending id order."""
    groups, inverse = _group_index(group_ids)
    squares = torch.zeros(len(groups), dtype=log_weights.dtype).index_add(0, inverse, (2 * log_weights).exp())
    return 1.0 / squares


def resample(log_weights: Tensor, group_ids: Tensor, draws: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Multinomial resampling with replacement: ``draws`` row indices per group, drawn with probabilities
    exp(log_weights) among the group's rows. -> (n * draws,) long, groups in ascending id order, each group's
    draws contiguous and sorted (rows of a group stay together, as the estimators expect)."""
    if draws < 1:
        raise InputError(f"draws must be >= 1 per group, got {draws}")
    groups, inverse = _group_index(group_ids)
    order = torch.argsort(inverse, stable=True)  # rows grouped, in their original order within each group
    sizes = torch.bincount(inverse, minlength=len(groups))
    width = int(sizes.max())
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(len(order)) - starts[inverse[order]]  # each grouped row's place in its group
    rows = torch.zeros(len(groups), width, dtype=torch.long)
    probs = torch.zeros(len(groups), width, dtype=torch.float64)
    rows[inverse[order], slot] = order
    probs[inverse[order], slot] = log_weights[order].to(torch.float64).exp()
    picked = torch.multinomial(probs, draws, replacement=True, generator=generator)  # (n, draws) slots
    return rows.gather(1, picked.sort(dim=1).values).reshape(-1)


def long_horizon_resample(rollout: Rollout, *, temperature: float, samples_per_prompt: int,
                          seed: int) -> tuple[Rollout, dict[str, float]]:
    """``samples_per_prompt`` completions per prompt, resampled from the rollout's candidates towards
    p^(1/T) / Z (module docstring). ``rollout.logp`` must be the engine's temperature-1 log-probs (B, T).

    Returns the chosen rows (their ``logp`` unchanged: still the temperature-1 log-probs of the sampling policy,
    which the learner's ratios and off-policy weights compare against) and metrics: ``lhts/ess`` (mean ESS per
    prompt), ``lhts/ess_frac`` (ESS / pool size), ``lhts/unique_frac`` (distinct candidates among the chosen).
    """
    log_w = tempered_log_weights(sequence_logprob(rollout.logp, rollout.mask), rollout.group_ids,
                                 temperature=temperature)
    generator = torch.Generator().manual_seed((seed ^ _SALT) % 2**63)
    index = resample(log_w, rollout.group_ids, samples_per_prompt, generator=generator)
    ess = effective_sample_size(log_w, rollout.group_ids)  # (n,)
    _, pool = torch.unique(rollout.group_ids, sorted=True, return_counts=True)
    chosen = index.reshape(len(pool), samples_per_prompt)
    unique = torch.tensor([len(set(r)) for r in chosen.tolist()], dtype=torch.float64) / samples_per_prompt
    metrics = {"lhts/ess": float(ess.mean()), "lhts/ess_frac": float((ess / pool).mean()),
               "lhts/unique_frac": float(unique.mean())}
    return rollout.take(index), metrics


@dataclass
class LongHorizonPending:
    """A submitted rollout of candidates whose :meth:`result` is the resampled rollout; ``metrics`` are set then."""

    pending: Any  # PendingRollout: the engine's G*k candidates per prompt
    temperature: float
    samples_per_prompt: int
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)

    def result(self) -> Rollout:
        rollout, self.metrics = long_horizon_resample(self.pending.result(), temperature=self.temperature,
                                                      samples_per_prompt=self.samples_per_prompt, seed=self.seed)
        return rollout
