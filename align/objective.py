"""The objective of one micro-batch: policy loss + optional KL-in-loss (+ vf_coef * value loss with a critic),
reduced with step-wide counts.

``policy_step_loss`` (and ``value_step_loss`` when the algorithm trains a critic) is what a trainer calls per
micro-batch; because every reducer divides by counts of the whole
optimiser step (:class:`~align.losses.StepNormalizer`), the micro-batch losses add up to the step's loss and
their gradients to the step's gradient, however the step is split over micro-batches or ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.errors import InputError
from align.losses import KL_ESTIMATORS, POLICY_LOSSES, REDUCERS, VALUE_LOSSES, PolicyInputs, StepNormalizer
from align.ops import as_float_mask, check_finite, check_same_shape, masked_fill_zero
from align.types import Metrics


def validate_policy_inputs(x: PolicyInputs, ref_logp: Tensor | None = None) -> PolicyInputs:
    """Check shapes and finiteness (where the mask is 1); return inputs with a float mask and clean padding.

    Values at masked positions are replaced by 0 so NaN/inf padding can never reach the loss or its gradient.
    """
    if x.logp.dim() != 2:
        raise InputError(f"logp must be (B, T) log-probs of the sampled tokens, got shape {tuple(x.logp.shape)}")
    check_same_shape("logp", x.logp, old_logp=x.old_logp, advantages=x.advantages, ref_logp=ref_logp,
                     entropy=x.entropy, token_ids=x.token_ids)
    mask = as_float_mask(x.mask, x.logp)
    if x.group_ids is not None and x.group_ids.shape != x.logp.shape[:1]:
        raise InputError(f"group_ids must be (B,) = {tuple(x.logp.shape[:1])}, got {tuple(x.group_ids.shape)}")
    for name, t in (("logp", x.logp), ("old_logp", x.old_logp), ("advantages", x.advantages),
                    ("ref_logp", ref_logp), ("entropy", x.entropy)):
        if t is not None:
            check_finite(name, t.detach(), mask)
    return PolicyInputs(
        logp=masked_fill_zero(x.logp, mask),
        old_logp=masked_fill_zero(x.old_logp.detach(), mask),
        advantages=masked_fill_zero(x.advantages.detach().to(x.logp.dtype), mask),
        mask=mask,
        token_ids=x.token_ids,
        group_ids=x.group_ids,
        entropy=None if x.entropy is None else masked_fill_zero(x.entropy.detach(), mask),
    )


def zero_advantage_is_inert(spec: AlgorithmSpec) -> bool:
    """True when a row whose advantages are all exactly 0 adds exactly 0 to the loss and to its gradient.

    Holds for losses of the form f(ratio) * A (registered with ``inert_at_zero_advantage``: PPO-clip, REINFORCE,
    CISPO, GSPO) when no KL term sits in the loss; not for GTPO (its entropy term acts at A = 0), with a
    KL-in-loss term, nor with a critic (its value loss acts at A = 0). A trainer may then skip such rows' forward
    and backward: the step's gradient is unchanged because every reducer divides by counts of the whole step
    (:class:`~align.losses.StepNormalizer`).
    """
    if spec.kind != "policy" or spec.policy_loss is None or spec.value_loss is not None:
        return False
    kl_in_loss = spec.kl is not None and spec.kl_placement == "loss"
    return not kl_in_loss and bool(POLICY_LOSSES.info(spec.policy_loss).get("inert_at_zero_advantage"))


def active_rows(spec: AlgorithmSpec, advantages: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """(B,) bool: rows whose forward and backward can change the step's gradient.

    When :func:`zero_advantage_is_inert` holds, whole groups whose advantages are all exactly 0 (every sample got
    the same reward, so group-baseline estimators give 0) are False: skipping them leaves the gradient unchanged.
    Whole groups only, so group-wise loss terms never see a partial group. advantages, mask: (B, T); group_ids: (B,).
    """
    if not zero_advantage_is_inert(spec) or len(group_ids) == 0:
        return torch.ones(len(group_ids), dtype=torch.bool)
    moves = ((advantages != 0) & (mask != 0)).any(-1)  # (B,)
    _, group = group_ids.unique(return_inverse=True)
    live = torch.zeros(int(group.max()) + 1).index_add_(0, group, moves.float()) > 0  # (G,)
    return live[group]


def policy_step_loss(
    spec: AlgorithmSpec, inputs: PolicyInputs, normalizer: StepNormalizer, *, ref_logp: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """Scalar loss of one micro-batch as a share of the whole optimiser step, and detached metrics.

    inputs: per-token tensors (B, T); ref_logp: (B, T), required when the spec puts a KL term in the loss.
    Metrics: ``loss``, ``pg_loss`` and ``kl`` (reduced like the loss, so they add up over micro-batches) plus the
    policy loss's own stats (means over this micro-batch's tokens).
    """
    if spec.kind != "policy":
        raise InputError(f"algorithm {spec.name!r} is a preference algorithm; use preference_loss instead")
    assert spec.policy_loss is not None and spec.reducer is not None
    kl_in_loss = spec.kl is not None and spec.kl_placement == "loss"
    if kl_in_loss and ref_logp is None:
        raise InputError(f"algorithm {spec.name!r} puts a {spec.kl} KL term in the loss: pass ref_logp (B, T)")
    x = validate_policy_inputs(inputs, ref_logp if kl_in_loss else None)
    reduce = REDUCERS.get(spec.reducer)
    token_loss, stats = POLICY_LOSSES.get(spec.policy_loss)(x, **spec.loss_kwargs)
    pg_loss = reduce(token_loss, x.mask, normalizer)
    metrics: Metrics = {"pg_loss": pg_loss.detach(), **stats}
    loss = pg_loss
    if kl_in_loss:
        assert spec.kl is not None and ref_logp is not None
        kl_tokens = masked_fill_zero(KL_ESTIMATORS.get(spec.kl)(x.logp, masked_fill_zero(ref_logp.detach(), x.mask)),
                                     x.mask)
        kl = reduce(kl_tokens, x.mask, normalizer)
        loss = loss + spec.kl_coef * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def value_step_loss(
    spec: AlgorithmSpec, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
    normalizer: StepNormalizer,
) -> tuple[Tensor, Metrics]:
    """vf_coef x the critic's loss of one micro-batch, as a share of the whole optimiser step, and detached metrics.

    values: (B, T) V_theta(s_t) with gradient; old_values: (B, T) V_old(s_t) from the rollout, before the update;
    returns: (B, T) the critic's targets (GAE: A_t + V_old(s_t)); mask: (B, T). The per-token loss is reduced by the
    step-wide token mean (as OpenRLHF's and TRL's masked means, but over the whole step), whatever the policy's
    reducer, so micro-batch losses add up. Metrics: ``vf_loss`` (the reduced loss before vf_coef; adds up over
    micro-batches) and the value loss's own stats (means over this micro-batch's tokens).
    """
    if spec.value_loss is None:
        raise InputError(f"algorithm {spec.name!r} trains no critic (value_loss=None); there is no value loss")
    check_same_shape("values", values, old_values=old_values, returns=returns)
    m = as_float_mask(mask, values)
    for name, t in (("values", values.detach()), ("old_values", old_values), ("returns", returns)):
        check_finite(name, t, m)
    token_loss, stats = VALUE_LOSSES.get(spec.value_loss)(values, old_values, returns, m, **spec.value_kwargs)
    vf_loss = REDUCERS.get("token_mean")(token_loss, m, normalizer)
    return spec.vf_coef * vf_loss, {"vf_loss": vf_loss.detach(), **stats}
