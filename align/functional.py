"""Functional facade: the stable entry points that documentation, benchmarks and outside checks call.

Per-token tensors are (B, T) over response tokens; ``mask`` 1 = trainable. Each call treats its batch as one whole
optimiser step (for micro-batching, build a :class:`~align.losses.StepNormalizer` once per step and call
:func:`align.objective.policy_step_loss` per micro-batch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from align.advantages import ADVANTAGES
from align.algorithms import PRESETS, AlgorithmSpec, resolve
from align.errors import InputError
from align.losses import PREFERENCE_LOSSES, PolicyInputs, PreferenceInputs, StepNormalizer
from align.objective import policy_step_loss
from align.ops import as_float_mask, check_finite, check_same_shape, masked_fill_zero

__all__ = ["advantages", "policy_objective", "preference_loss"]


def advantages(name: str, *, rewards: Tensor, mask: Tensor, group_ids: Tensor, **kw: Any) -> Tensor:
    """Advantages (B, T) from the registered estimator ``name``.

    rewards: (B,) sequence rewards or (B, T) token rewards; mask: (B, T); group_ids: (B,) long; ``kw``: the
    estimator's options (for example ``scale_by_std=False`` for grpo, ``values=`` for gae).
    """
    return ADVANTAGES.get(name)(rewards, mask, group_ids, **kw)


def policy_objective(
    spec: str | AlgorithmSpec,
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    token_ids: Tensor | None = None,
    group_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The scalar loss of this batch as one whole optimiser step, and metrics as floats.

    spec: a preset name (``"grpo"``, ``"dapo"``, ...) or an :class:`AlgorithmSpec`. logp requires grad; ref_logp is
    needed when the spec puts a KL term in the loss; entropy, token_ids and group_ids (B,) are needed by gtpo.
    """
    algorithm = resolve(spec)
    normalizer = StepNormalizer.from_masks(mask, generation_budget=algorithm.generation_budget)
    inputs = PolicyInputs(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, token_ids=token_ids,
                          group_ids=group_ids, entropy=entropy)
    loss, metrics = policy_step_loss(algorithm, inputs, normalizer, ref_logp=ref_logp)
    return loss, {k: float(v) for k, v in metrics.items()}


def preference_loss(
    name: str,
    *,
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor | None,
    ref_rejected_logp: Tensor | None,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    **kw: Any,
) -> tuple[Tensor, dict[str, float]]:
    """Mean pairwise loss over the batch, and metrics as floats.

    name: a preference loss (``dpo``, ``ipo``, ``simpo``, ``tdpo1``, ``tdpo2``, ``cdpo``, ``tgdpo``) or a preference
    preset (``tdpo`` = tdpo2 with its defaults). Log-probs are per token, (B, Tc) for chosen and (B, Tr) for
    rejected; ``kw`` holds hyperparameters and extra tensors (tdpo: ``chosen_logits``, ``rejected_logits``,
    ``ref_chosen_logits``, ``ref_rejected_logits`` (B, T, V); cdpo: ``chosen_weights``/``rejected_weights``;
    tgdpo: ``chosen_token_rewards``/``rejected_token_rewards``). The reference log-probs may be None for simpo.
    """
    if name in PREFERENCE_LOSSES:
        fn, options = PREFERENCE_LOSSES.get(name), dict(kw)
    elif name in PRESETS and PRESETS.get(name).kind == "preference":
        preset = PRESETS.get(name)
        assert preset.preference_loss is not None
        fn, options = PREFERENCE_LOSSES.get(preset.preference_loss), {**preset.preference_kwargs, **kw}
    else:
        PREFERENCE_LOSSES.get(name)  # raises with the known names
        raise AssertionError("unreachable")
    inputs = _preference_inputs(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, chosen_mask,
                                rejected_mask)
    per_pair, stats = fn(inputs, **options)
    loss = per_pair.mean()
    if not bool(torch.isfinite(loss.detach())):
        raise InputError(f"{name} produced a non-finite loss from finite inputs; check the extra tensors in kw")
    return loss, {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}}


def _preference_inputs(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor | None,
    ref_rejected_logp: Tensor | None,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
) -> PreferenceInputs:
    if chosen_logp.dim() != 2 or rejected_logp.dim() != 2 or chosen_logp.shape[0] != rejected_logp.shape[0]:
        raise InputError(f"chosen_logp {tuple(chosen_logp.shape)} and rejected_logp {tuple(rejected_logp.shape)} "
                         "must be (B, Tc) and (B, Tr) with the same number of pairs B")
    check_same_shape("chosen_logp", chosen_logp, ref_chosen_logp=ref_chosen_logp)
    check_same_shape("rejected_logp", rejected_logp, ref_rejected_logp=ref_rejected_logp)
    c_mask = as_float_mask(chosen_mask, chosen_logp, name="chosen_mask")
    r_mask = as_float_mask(rejected_mask, rejected_logp, name="rejected_mask")
    for label, t, m in (("chosen_logp", chosen_logp, c_mask), ("rejected_logp", rejected_logp, r_mask),
                        ("ref_chosen_logp", ref_chosen_logp, c_mask), ("ref_rejected_logp", ref_rejected_logp, r_mask)):
        if t is not None:
            check_finite(label, t.detach(), m)

    def clean(t: Tensor | None, m: Tensor) -> Tensor | None:
        return None if t is None else masked_fill_zero(t, m)

    return PreferenceInputs(
        chosen_logp=masked_fill_zero(chosen_logp, c_mask),
        rejected_logp=masked_fill_zero(rejected_logp, r_mask),
        chosen_mask=c_mask,
        rejected_mask=r_mask,
        ref_chosen_logp=clean(None if ref_chosen_logp is None else ref_chosen_logp.detach(), c_mask),
        ref_rejected_logp=clean(None if ref_rejected_logp is None else ref_rejected_logp.detach(), r_mask),
    )
