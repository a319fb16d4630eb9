"""Rollout correction: weights for the gap between the policy that sampled a batch and the learner's own policy.

The engine that samples (vLLM, or the transformers engine one step behind under ``runtime.overlap``) and the learner
that trains never assign exactly the same probabilities: other kernels, other precision, or older weights. With
rho_t = pi_learner(y_t) / pi_rollout(y_t) on each sampled token, every entry here maps
(learner_logp (B, T), rollout_logp (B, T), mask (B, T), **options) -> (weights (B, T), stats): the learner
multiplies the advantages by ``weights`` (0 where the mask is 0) and uses its own log-probs as pi_old of the PPO
ratio (decoupled PPO: Hilton et al. 2021, arXiv 2110.00641; verl's "decoupled" mode).

Two families (verl ``rollout_corr``, docs/algo/rollout_corr_math.md §3.3-3.5):

- truncation (``tis``, ``seq_tis``, ``geo_tis``): weight min(rho, C), per token, per sequence (the product), or per
  sequence with the geometric mean;
- masking (``mis``, ``seq_mis``, ``icepop``, ``geo_mask``): a token or a whole sequence whose ratio leaves [lo, hi]
  gets weight 0; the others keep their ratio (``geo_mask``: weight 1, verl's pure geometric rejection).

Numerics: ratios are exp(log rho) with log rho clamped to at most 20 (verl's safety bound, exp(20) ~ 4.85e8), so
a sequence product never overflows; below, exp underflows to 0 harmlessly. Values off the mask are never read (NaN
or inf padding cannot leak). Statistics, all over the rows' tokens (mask 1), keys under ``rollout_correction/``:
``kl_k1`` = mean(log pi_rollout - log pi_learner) and ``kl_k3`` = mean(rho - 1 - log rho) (estimates of
KL(pi_rollout || pi_learner) on the sampled tokens: Schulman 2020; verl's ``kl`` / ``k3_kl``); ``ratio_mean``,
``ratio_max``, ``ratio_min`` of the ratio at the correction's level (per token; the product or the geometric mean of
the row for sequence levels, counted once per token); ``weight_mean`` (the applied weights, zeros included);
``masked_frac`` and ``truncated_frac`` (shares of tokens given weight 0 by a mask, or capped at C).

Departure from verl and slime: a masked token's weight is 0 but it stays in the step's loss normaliser (the
normaliser is counted over the whole step before any ratio is known; verl and slime drop rejected tokens from the
denominator, slime PR #657). The weights multiply the advantages only: a KL-in-loss term still acts on a masked
token, as in IcePop's objective, where the mask multiplies the clipped surrogate alone.

Shapes: B rows, T response tokens.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from align.ops import check_same_shape
from align.registry import Registry

Correction = Callable[..., tuple[Tensor, dict[str, float]]]
ROLLOUT_CORRECTIONS: Registry[Correction] = Registry("rollout correction")

PREFIX = "rollout_correction/"
SAFETY_LOG = 20.0  # log rho is clamped to at most this before exp (verl's SAFETY_BOUND)
_MAX_THRESHOLD = math.exp(SAFETY_LOG)


# ---------------------------------------------------------------------------------------------------------------
# Options: one-line errors, checked before any tensor is touched
# ---------------------------------------------------------------------------------------------------------------
def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _cap(cap: float) -> float:
    cap = _finite("cap", cap)
    if not 0 < cap < _MAX_THRESHOLD:
        raise ValueError(f"cap must be > 0 (and below exp(20) ~ 4.85e8, the ratios' safety bound), got {cap:g}")
    return cap


def _bounds(lo_name: str, lo: float, hi_name: str, hi: float) -> tuple[float, float]:
    lo, hi = _finite(lo_name, lo), _finite(hi_name, hi)
    if lo < 0:
        raise ValueError(f"{lo_name} must be >= 0 (a probability ratio), got {lo:g}")
    if not lo < hi:
        raise ValueError(f"{lo_name} must be < {hi_name}, got {lo_name}={lo:g} and {hi_name}={hi:g}")
    if hi >= _MAX_THRESHOLD:
        raise ValueError(f"{hi_name} must be below exp(20) ~ 4.85e8 (the ratios' safety bound), got {hi:g}")
    return lo, hi


def _default_lo(lo: float | None, hi: float) -> float:
    """verl's default lower bound: the reciprocal of the upper one."""
    if lo is not None:
        return lo
    hi = _finite("hi", hi)
    if hi <= 0:
        raise ValueError(f"hi must be > 0, got {hi:g}")
    return 1.0 / hi


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------
Level = Literal["token", "sequence", "geometric"]


def _inputs(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(log rho (B, T), 0 off the mask; float mask (B, T)) in at least float32, without gradient."""
    check_same_shape("learner_logp", learner_logp, rollout_logp=rollout_logp, mask=mask)
    dtype = torch.promote_types(learner_logp.dtype, torch.float32)
    keep = mask != 0
    m = keep.to(dtype)
    log_rho = torch.where(keep, learner_logp.detach().to(dtype) - rollout_logp.detach().to(dtype),
                          torch.zeros((), dtype=dtype, device=learner_logp.device))
    return log_rho, m


def _level_log_ratio(log_rho: Tensor, m: Tensor, level: Level) -> Tensor:
    """log of the ratio each token is judged by (B, T): its own, its row's product, or its row's geometric mean."""
    if level == "token":
        return log_rho
    total = (log_rho * m).sum(-1, keepdim=True)  # (B, 1) log of the product over the row's tokens
    if level == "sequence":
        return total.expand_as(log_rho)
    return (total / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(log_rho)


def _ratio(log_ratio: Tensor) -> Tensor:
    return torch.exp(log_ratio.clamp(max=SAFETY_LOG))


def _stats(log_rho: Tensor, ratio: Tensor, weights: Tensor, masked: Tensor, truncated: Tensor,
           m: Tensor) -> dict[str, float]:
    """The ``rollout_correction/*`` statistics over the tokens with mask 1 (see the module docstring)."""
    tokens = m.sum().clamp(min=1)
    capped = log_rho.clamp(max=SAFETY_LOG)
    out = {
        "kl_k1": float((-log_rho * m).sum() / tokens),
        "kl_k3": float(((torch.expm1(capped) - capped) * m).sum() / tokens),  # rho - 1 - log rho, exact near 0
        "ratio_mean": float((ratio * m).sum() / tokens),
        "weight_mean": float(weights.sum() / tokens),
        "masked_frac": float((masked.to(m.dtype) * m).sum() / tokens),
        "truncated_frac": float((truncated.to(m.dtype) * m).sum() / tokens),
    }
    if bool((m != 0).any()):
        on = m != 0
        out["ratio_max"] = float(ratio[on].max())
        out["ratio_min"] = float(ratio[on].min())
    return {PREFIX + k: v for k, v in out.items()}


def _truncated(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: Level,
               cap: float) -> tuple[Tensor, dict[str, float]]:
    cap = _cap(cap)
    log_rho, m = _inputs(learner_logp, rollout_logp, mask)
    ratio = _ratio(_level_log_ratio(log_rho, m, level))
    weights = ratio.clamp(max=cap) * m
    return weights, _stats(log_rho, ratio, weights, torch.zeros_like(m), ratio > cap, m)


def _masked(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: Level, lo: float, hi: float,
            keep_ratio: bool) -> tuple[Tensor, dict[str, float]]:
    log_rho, m = _inputs(learner_logp, rollout_logp, mask)
    ratio = _ratio(_level_log_ratio(log_rho, m, level))
    inside = (ratio >= lo) & (ratio <= hi)
    kept = ratio if keep_ratio else torch.ones_like(ratio)
    weights = torch.where(inside, kept, torch.zeros_like(kept)) * m
    return weights, _stats(log_rho, ratio, weights, ~inside, torch.zeros_like(inside), m)


# ---------------------------------------------------------------------------------------------------------------
# Truncated importance sampling
# ---------------------------------------------------------------------------------------------------------------
@ROLLOUT_CORRECTIONS.register("tis", level="token")
def tis(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *,
        cap: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """Token-level truncated IS: w_t = min(rho_t, C).

    Truncated importance sampling (Espeholt et al. 2018, arXiv 1802.01561 eq. 1, rho-bar); applied to the
    engine-learner gap by Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (https://fengyao.notion.site/off-policy-rl, TIS, C = 2); verl ``rollout_is: token`` (rollout_corr_math.md
    §3.3.1). Default C = 2 (verl's ``rollout_is_threshold``, slime's ``--tis-clip``). Also
    ``runtime.is_level: token`` of ``runtime.overlap`` (``runtime.is_cap``), with its exact numbers.
    """
    return _truncated(learner_logp, rollout_logp, mask, "token", cap)


@ROLLOUT_CORRECTIONS.register("seq_tis", level="sequence")
def seq_tis(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *,
            cap: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """Sequence-level truncated IS: w_i = min(prod_t rho_t, C) = min(exp(sum_t log rho_t), C), on every token of
    the row.

    Liu, Li et al. 2025, "When Speed Kills Stability" (https://richardli.xyz/rl-collapse, part 2: Seq-TIS); verl
    ``rollout_is: sequence`` (rollout_corr_math.md §3.3.2). Default C = 2 (verl's ``decoupled_seq_is``). The sum
    of log-ratios is exponentiated only after clamping at 20 (verl's safety bound), so long rows never overflow.
    """
    return _truncated(learner_logp, rollout_logp, mask, "sequence", cap)


@ROLLOUT_CORRECTIONS.register("geo_tis", level="geometric")
def geo_tis(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *,
            cap: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """Geometric-mean sequence truncation: w_i = min(exp(mean_t log rho_t), C), on every token of the row.

    The length-normalised sequence ratio of GSPO (Zheng et al. 2025, arXiv 2507.18071 eq. 7), truncated as TIS;
    OpenRLHF's ``seq-mask-tis`` filters on the same geometric mean. This is ``runtime.is_level: sequence`` of
    ``runtime.overlap`` (``runtime.is_cap``), with its exact numbers. Default C = 2. A project choice, not a
    published estimator: it is biased like token TIS, with one weight per row.
    """
    return _truncated(learner_logp, rollout_logp, mask, "geometric", cap)


# ---------------------------------------------------------------------------------------------------------------
# Masked importance sampling (rejection)
# ---------------------------------------------------------------------------------------------------------------
@ROLLOUT_CORRECTIONS.register("mis", level="token")
def mis(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, hi: float = 2.0,
        lo: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Token-level masked IS: w_t = rho_t if lo <= rho_t <= hi, else 0.

    Liu, Li et al. 2025, "When Speed Kills Stability" (https://richardli.xyz/rl-collapse-3, part 3: MIS, rejection
    over clipping); verl ``rollout_is: token`` + ``rollout_rs: token`` (rollout_corr_math.md §3.5; token_is_rs).
    Kept tokens keep their ratio rho_t, as the blog's MIS estimator rho * 1[rho <= C] and verl (whose kept tokens lie
    under the truncation threshold, so truncation leaves them as they are). Defaults hi = 2, lo = 1 / hi = 0.5
    (verl's ``0.5_2.0``); the blog's mask is one-sided, lo = 0 gives it.
    """
    lo, hi = _bounds("lo", _default_lo(lo, hi), "hi", hi)
    return _masked(learner_logp, rollout_logp, mask, "token", lo, hi, keep_ratio=True)


@ROLLOUT_CORRECTIONS.register("seq_mis", level="sequence")
def seq_mis(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, hi: float = 2.0,
            lo: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Sequence-level masked IS: w_i = prod_t rho_t on every token of row i if lo <= prod_t rho_t <= hi, else 0
    (the whole row).

    Liu, Li et al. 2025 (https://richardli.xyz/rl-collapse-3, Seq-MIS); verl ``rollout_is: sequence`` +
    ``rollout_rs: seq_sum_k1`` (rollout_corr_math.md §3.3.2 and §3.5; ``decoupled_seq_is_rs``). Defaults hi = 2,
    lo = 1 / hi = 0.5 (verl's ``0.5_2.0``); lo = 0 gives the blog's one-sided mask rho * 1[rho <= C].
    """
    lo, hi = _bounds("lo", _default_lo(lo, hi), "hi", hi)
    return _masked(learner_logp, rollout_logp, mask, "sequence", lo, hi, keep_ratio=True)


@ROLLOUT_CORRECTIONS.register("icepop", level="token")
def icepop(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, alpha: float = 0.5,
           beta: float = 5.0) -> tuple[Tensor, dict[str, float]]:
    """IcePop: w_t = M(rho_t) with M(k) = k if alpha <= k <= beta, else 0 (double-sided token masking).

    Ling Team 2025, "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking Model"
    (Ring-1T, arXiv 2510.18855, IcePop objective and its M(k)); blog "Small Leak Can Sink a Great Ship: Boost RL
    Training on MoE with IcePop" (https://ringtech.notion.site/icepop). Defaults alpha = 0.5, beta = 5: the values
    OpenRLHF ships for its ``icepop`` mode (``--algo.advantage.is_correction_threshold 0.5 5.0``); slime's
    ``icepop_function`` reads its generic TIS bounds instead. Unlike verl's masks, kept tokens keep rho_t.
    """
    alpha, beta = _bounds("alpha", alpha, "beta", beta)
    return _masked(learner_logp, rollout_logp, mask, "token", alpha, beta, keep_ratio=True)


@ROLLOUT_CORRECTIONS.register("geo_mask", level="geometric")
def geo_mask(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, lo: float = 0.999,
             hi: float = 1.001) -> tuple[Tensor, dict[str, float]]:
    """Geometric rejection: a row whose geometric-mean ratio exp(mean_t log rho_t) leaves [lo, hi] gets weight 0 on
    every token; kept rows get weight 1 (pure rejection, no IS weight).

    Liu, Li et al. 2025 (https://richardli.xyz/rl-collapse-3, part 3: the length trap and geometric RS); verl
    ``rollout_rs: seq_mean_k1`` ("geometric", rollout_corr_math.md §3.3.3; ``decoupled_geo_rs``). Defaults
    lo = 0.999, hi = 1.001 (verl's ``0.999_1.001``, about 0.1 % average per-token drift). verl's optional
    catastrophic-token veto is not included.
    """
    lo, hi = _bounds("lo", lo, "hi", hi)
    return _masked(learner_logp, rollout_logp, mask, "geometric", lo, hi, keep_ratio=False)


# ---------------------------------------------------------------------------------------------------------------
# A named correction with its options, as it travels in a batch
# ---------------------------------------------------------------------------------------------------------------
def option_names(name: str) -> list[str]:
    """The keyword-only options of the correction called ``name`` (unknown name: the registry's error)."""
    fn = ROLLOUT_CORRECTIONS.get(name)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError (one line) when ``options`` are not the correction's, or out of range."""
    valid = option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"rollout correction {name!r} has no option {unknown[0]!r}; valid: {', '.join(valid)}")
    one = torch.zeros(1, 1)
    ROLLOUT_CORRECTIONS.get(name)(one, one, torch.ones(1, 1), **options)  # runs the same checks as a step


@dataclass(frozen=True)
class RolloutCorrection:
    """A registered correction and its options: what a :class:`~align.trainers.batches.PolicyBatch` carries to the
    learner (pickles as it is, for Ray ranks)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(self.name, self.options)

    @classmethod
    def legacy(cls, level: Literal["token", "sequence"], cap: float) -> RolloutCorrection:
        """``runtime.is_level`` / ``runtime.is_cap`` of ``runtime.overlap``: ``tis`` per token, ``geo_tis`` per
        sequence."""
        return cls("tis" if level == "token" else "geo_tis", {"cap": cap})

    def __call__(self, learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        return ROLLOUT_CORRECTIONS.get(self.name)(learner_logp, rollout_logp, mask, **self.options)
