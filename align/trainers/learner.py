"""The learner: one optimiser step's math, written once for every runtime.

A learner owns a model and a :class:`Strategy` that applies gradients: :class:`TorchStrategy` in-process (the
local runtime), a DeepSpeed engine on each Ray rank (``ray_jobs.learner_deepspeed``). Everything else (micro-batches
of whole groups, inert-group skipping, the rollout correction's weights, the policy and preference losses, the
statistics) is here, so a rank of the Ray runtime computes exactly what the local runtime computes.

The step-wide normaliser (:class:`~align.losses.StepNormalizer`) and the step's pair count arrive with the batch,
computed by the controller over the *whole* step, so a rank's loss is its exact share of the step's loss: the
shares add up, and splitting a step over micro-batches or ranks never changes the gradient.

Shapes: B rows, T response tokens, P prompt tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.losses import PREFERENCE_LOSSES, PolicyInputs, PreferenceInputs
from align.losses.rollout_correction import PREFIX as CORRECTION
from align.objective import active_rows, policy_step_loss, value_step_loss
from align.ops import masked_fill_zero
from align.trainers.batches import OffPolicy, PairBatch, PolicyBatch
from align.trainers.critic import ActorCritic, policy_of, policy_weights
from align.trainers.precision import Precision, autocast
from align.trainers.sequences import response_forward, response_outputs
from align.trainers.strategy import Reference, Strategy

__all__ = ["InProcessLearner", "OffPolicy", "PairBatch", "PolicyBatch", "PolicyLearner", "PreferenceLearner",
           "Reference", "Strategy", "merge_stats"]


# ---------------------------------------------------------------------------------------------------------------
# Statistics: what each learner (or rank) reports, and the one merge for one or several of them
# ---------------------------------------------------------------------------------------------------------------
ADDITIVE = ("loss", "pg_loss", "kl", "vf_loss")  # shares of the step's loss: they add up over micro-batches and ranks
_WEIGHTS = ("update/active_tokens", "update/tokens", "update/rows", "update/active_rows", "update/pairs")
_SAME_ON_EVERY_RANK = ("grad_norm", "lr")
_EXTREMES = {f"{CORRECTION}ratio_max": max, f"{CORRECTION}ratio_min": min}  # the step's: over its shares' extremes
_PER_TOKEN_OF_ALL = ("is/", CORRECTION)  # computed over every token of the share (skipped rows too)


def merge_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The step's statistics from those of its shares (one part in-process, one per rank on Ray).

    Loss terms add up; per-token statistics are weighted by the tokens each share put through the model
    (``is/*`` and ``rollout_correction/*``: by all its tokens; preference stats by its pairs), except the extremes
    ``rollout_correction/ratio_max`` (the largest share's maximum) and ``ratio_min`` (the smallest minimum), from
    shares with tokens; ``grad_norm`` and ``lr`` are global already; the skipped share is counted in rows.
    ``time/learner_compute`` is the slowest share (they run in parallel).
    """
    keys = sorted({k for p in parts for k in p} - set(_WEIGHTS))
    out: dict[str, float] = {}
    active = [p.get("update/active_tokens", 0.0) for p in parts]
    tokens = [p.get("update/tokens", 0.0) for p in parts]
    pairs = [p.get("update/pairs", 0.0) for p in parts]
    for key in keys:
        values = [p.get(key) for p in parts]
        if key in ADDITIVE:
            out[key] = sum(v for v in values if v is not None)
        elif key in _SAME_ON_EVERY_RANK:
            out[key] = next(v for v in values if v is not None)
        elif key == "time/learner_compute":
            out[key] = max(v for v in values if v is not None)
        elif key in _EXTREMES:  # a stand-in share (no tokens of its own) reports no extreme of the step
            counted = [v for v, w in zip(values, tokens, strict=True) if v is not None and w > 0]
            out[key] = _EXTREMES[key](counted or [v for v in values if v is not None])
        else:
            weights = pairs if any(pairs) else tokens if key.startswith(_PER_TOKEN_OF_ALL) else active
            present = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None and w > 0]
            if present:
                out[key] = sum(v * w for v, w in present) / sum(w for _, w in present)
    if any("update/rows" in p for p in parts):
        rows = sum(p.get("update/rows", 0.0) for p in parts)
        out["update/skipped_rows_frac"] = 1.0 - sum(p.get("update/active_rows", 0.0) for p in parts) / max(rows, 1)
    return out


class _Weights:
    """What both learners share: the trained weights and the checkpoint of their strategy."""

    strategy: Strategy

    def policy_state(self) -> dict[str, Tensor]:
        """The trained policy's weights on CPU: the LoRA adapter alone (PEFT names) under LoRA, else the full model;
        never a critic's value head (:func:`~align.trainers.critic.policy_weights`)."""
        policy = policy_of(self.strategy.model)
        if hasattr(policy, "peft_config"):
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(policy)
            return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        return policy_weights(self.strategy.full_state())

    def save(self, directory: Path) -> None:
        self.strategy.save(directory)

    def load(self, directory: Path) -> None:
        self.strategy.load(directory)


# ---------------------------------------------------------------------------------------------------------------
# Policy learner
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PolicyLearner(_Weights):
    """One optimiser step of a policy algorithm per :meth:`step` (``updates_per_batch`` > 1: several, re-using the
    batch off-policy).

    Micro-batches hold whole groups (``micro_batch_size`` rows at most, at least one group). Groups whose
    advantages are all exactly 0 are skipped when that is exact (:func:`~align.objective.active_rows`).
    With a critic (``spec.value_loss``) the strategy's model is an :class:`~align.trainers.critic.ActorCritic`:
    each micro-batch's loss is the policy loss + vf_coef * the value loss against the batch's ``returns``, from
    the same forward pass; :meth:`values` gives V_old before the update.
    """

    spec: AlgorithmSpec
    strategy: Strategy
    reference: Reference | None = None
    temperature: float = 1.0
    micro_batch_size: int = 64
    updates_per_batch: int = 1
    precision: Precision = "no"
    # each run of identical prompt rows (a group) goes through the model once, its KV cache shared by the group's
    # completions (align/trainers/shared_prefix.py): the same log-probs and gradients up to rounding, 1.9-2.2x
    # faster forward + backward on SmolLM2-135M, 1.7x on the tiny model (learner.share_prompt)
    share_prompt: bool = True

    def __post_init__(self) -> None:
        if self.spec.kind != "policy":
            raise ValueError(f"PolicyLearner needs a policy algorithm, got {self.spec.name!r} ({self.spec.kind})")
        self.critic = self.spec.value_loss is not None
        if self.critic != isinstance(self.strategy.model, ActorCritic):
            mismatch = ("trains a critic but the learner's model has no value head" if self.critic else
                        "trains no critic but the learner's model has a value head")
            raise ValueError(f"algorithm {self.spec.name!r} {mismatch}; build the learner with "
                             "align.build.make_learner (it wraps the policy in ActorCritic exactly when the algorithm "
                             "has a value_loss)")

    def _sharing(self, module: Any) -> dict[str, Any]:
        """``response_outputs``' prompt-sharing arguments for a forward on ``module``: ranks agree on sharing
        through the strategy (ZeRO-3 needs every rank's model calls to match), and the strategy's model is what its
        module (a DeepSpeed engine) wraps."""
        return dict(share_prompt=self.share_prompt, agree=self.strategy.agree_min,
                    unwrapped=self.strategy.model if module is self.strategy.module else None)

    # -- forward passes without gradient ------------------------------------------------------------------------
    def _forward(self, module: Any, batch: Any, *, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad(), autocast(self.precision, self.strategy.model):
            out = response_outputs(module, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.mask,
                                   temperature=self.temperature, with_entropy=with_entropy, **self._sharing(module))
        return out.logp, out.entropy

    def logprobs(self, batch: Any) -> Tensor:
        """(B, T) log-probs of ``batch``'s completion tokens under the current weights (a Rollout or a batch)."""
        self.strategy.model.eval()
        return self._forward(self.strategy.module, batch)[0]

    def ref_logprobs(self, batch: Any) -> Tensor:
        """(B, T) log-probs under the reference policy."""
        if self.reference is None:
            raise ValueError(f"algorithm {self.spec.name!r} reads no reference model; none was loaded")
        with self.reference.model() as ref:
            return self._forward(ref, batch)[0]

    def entropy(self, batch: Any) -> Tensor:
        """(B, T) entropy of the policy at each completion position (for credit modules that follow it)."""
        self.strategy.model.eval()
        entropy = self._forward(self.strategy.module, batch, with_entropy=True)[1]
        assert entropy is not None
        return entropy

    def values(self, batch: Any) -> Tensor:
        """(B, T) float32 critic values V(s_t) of ``batch``'s completion positions under the current weights (no
        gradient), 0 off the mask: V_old of the step about to be taken."""
        if not self.critic:
            raise ValueError(f"algorithm {self.spec.name!r} trains no critic; it has no values")
        self.strategy.model.eval()
        with torch.no_grad(), autocast(self.precision, self.strategy.model):
            out = response_outputs(self.strategy.module, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.mask, temperature=self.temperature,
                                   **self._sharing(self.strategy.module))
        assert out.values is not None
        return masked_fill_zero(out.values.float(), batch.mask)

    # -- the step -------------------------------------------------------------------------------------------------
    def _corrected(self, batch: PolicyBatch) -> tuple[PolicyBatch, dict[str, float]]:
        """The batch's rollout correction (``batch.correction``, :mod:`align.losses.rollout_correction`): the
        learner's own log-probs before the update become pi_old (the proximal policy of the PPO ratio; decoupled PPO,
        arXiv 2110.00641, as AReaL and verl) and the advantages are multiplied by the correction's weights, computed
        from pi_learner / pi_rollout on each sampled token (truncated, or 0 where a mask rejects a token or a row).

        A rejected token adds exactly 0 to the policy-gradient term (its advantage is 0; the weights are >= 0, so
        this equals weighting the per-token loss for every loss linear in A, PPO-clip's min included) and still
        counts in the step's normaliser, which the driver counted over the whole step before any ratio is known, so
        the ranks' shares stay exact. A KL-in-loss term still acts on it (IcePop's objective masks the surrogate
        alone). Costs one forward pass without gradient over the batch, on every step the correction runs.
        ``is/weight_mean`` and ``is/truncated_frac`` (runtime.overlap's names) repeat ``rollout_correction/
        ratio_mean`` and ``rollout_correction/truncated_frac``."""
        assert batch.correction is not None
        proximal = self.logprobs(batch)  # (B, T) pi_old: the learner's own log-probs, before the update
        weights, stats = batch.correction(proximal, batch.logp, batch.mask)  # (B, T), 0 off the mask
        stats = {**stats, "is/weight_mean": stats[f"{CORRECTION}ratio_mean"],
                 "is/truncated_frac": stats[f"{CORRECTION}truncated_frac"]}
        return replace(batch, advantages=batch.advantages * weights.to(batch.advantages.dtype), logp=proximal), stats

    def _micro_batches(self, batch: PolicyBatch, active: Tensor) -> list[Tensor]:
        """Row indices of micro-batches made of whole active groups, the groups taken longest first (by their
        longest completion, then prompt), so that each micro-batch, trimmed to its own widest row
        (:meth:`PolicyBatch.trimmed`), holds rows of similar length and little padding."""
        groups = batch.group_ids[active].unique_consecutive()
        if len(groups) > 1:
            ends = _row_ends(batch.mask)
            prompts = batch.prompt_mask.sum(-1)
            longest = torch.stack([torch.stack([ends[batch.group_ids == g].max(), prompts[batch.group_ids == g].max()])
                                   for g in groups])  # (groups, 2)
            order = sorted(range(len(groups)), key=lambda k: (-int(longest[k, 0]), -int(longest[k, 1]), k))
            groups = groups[torch.tensor(order)]
        sizes = torch.stack([(batch.group_ids == g).sum() for g in groups]) if len(groups) else torch.zeros(0)
        out: list[Tensor] = []
        start = 0
        while start < len(groups):  # greedily fill up to micro_batch_size rows, at least one group
            end, rows = start + 1, int(sizes[start])
            while end < len(groups) and rows + int(sizes[end]) <= self.micro_batch_size:
                rows += int(sizes[end])
                end += 1
            out.append((torch.isin(batch.group_ids, groups[start:end]) & active).nonzero().squeeze(-1))
            start = end
        return out

    def _with_value_loss(self, loss: Tensor, stats: dict[str, Tensor], values: Tensor | None, part: PolicyBatch,
                         batch: PolicyBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's loss + vf_coef * its share of the step's value loss (same step-wide token count)."""
        if values is None or part.old_values is None or part.returns is None:
            raise ValueError(f"algorithm {self.spec.name!r} trains a critic: the batch needs old_values and returns "
                             "(the workload computes them with learner.values before the update)")
        value_loss, value_stats = value_step_loss(self.spec, values, part.old_values, part.returns, part.mask,
                                                  batch.normalizer)
        total = loss + value_loss
        return total, {**stats, **value_stats, "loss": total.detach()}

    def step(self, batch: PolicyBatch) -> dict[str, float]:
        """One optimiser step (``updates_per_batch`` of them) over ``batch``; returns this share's statistics
        (merge several shares with :func:`merge_stats`)."""
        start = time.perf_counter()
        stats: dict[str, float] = {}
        rollout_logp = batch.logp  # (B, T) what the engine sampled with: the gap below is measured against it
        if batch.correction is not None:
            batch, stats = self._corrected(batch)
        active = active_rows(self.spec, batch.advantages, batch.mask, batch.group_ids)
        if batch.standin:
            active = torch.zeros_like(active)
        micro_batches = self._micro_batches(batch, active)
        # stand-ins: one row at loss scale 0, so that a share with nothing to move still steps the optimiser, and
        # every rank runs as many forward passes as the busiest one
        scales = [1.0] * len(micro_batches) + [0.0] * (self.strategy.agree(max(1, len(micro_batches)))
                                                       - len(micro_batches))
        micro_batches += [torch.arange(1)] * (len(scales) - len(micro_batches))
        tokens = float(batch.mask[active].sum())
        sums: dict[str, float] = {}
        weighted: dict[str, float] = {}
        gap_sum = entropy_sum = grad_norm = 0.0
        real = padded = padded_full = 0.0  # token positions through the model: real, run, at the step's full width
        # eval mode: dropout would make pi_theta differ from the pi_old that sampled (ratio != 1 at mu = 1);
        # gradients flow as usual
        self.strategy.model.eval()
        for update in range(self.updates_per_batch):
            for i, (rows, scale) in enumerate(zip(micro_batches, scales, strict=True)):
                part = batch.take(rows).trimmed()
                if update == 0 and scale:
                    padded_full += float(len(rows)) * (batch.prompt_ids.shape[1] + batch.mask.shape[1])
                    padded += float(len(rows)) * (part.prompt_ids.shape[1] + part.mask.shape[1])
                    real += float(part.prompt_mask.sum()) + float(_row_ends(part.mask).sum())
                with autocast(self.precision, self.strategy.model):
                    fwd = response_outputs(self.strategy.module, part.prompt_ids, part.prompt_mask,
                                           part.completion_ids, part.mask, temperature=self.temperature,
                                           with_entropy=True, **self._sharing(self.strategy.module))
                logp, entropy = fwd.logp, fwd.entropy
                inputs = PolicyInputs(logp=logp, old_logp=part.logp, advantages=part.advantages, mask=part.mask,
                                      token_ids=part.completion_ids, group_ids=part.group_ids, entropy=entropy)
                loss, loss_stats = policy_step_loss(self.spec, inputs, batch.normalizer, ref_logp=part.ref_logp)
                if self.critic:
                    loss, loss_stats = self._with_value_loss(loss, loss_stats, fwd.values, part, batch)
                self.strategy.backward(loss * scale, boundary=i == len(micro_batches) - 1)
                if update == 0 and scale:
                    share = float(part.mask.sum()) / max(tokens, 1.0)
                    for key, value in loss_stats.items():
                        if key in ADDITIVE:
                            sums[key] = sums.get(key, 0.0) + float(value)
                        else:
                            weighted[key] = weighted.get(key, 0.0) + share * float(value)
                    width = part.mask.shape[1]
                    gap_sum += float(((logp.detach() - rollout_logp[rows][:, :width]).abs() * part.mask).sum())
                    assert entropy is not None
                    entropy_sum += float((entropy * part.mask).sum())
            grad_norm = self.strategy.optimizer_step()
        self.strategy.scheduler_step()
        out = {"loss": 0.0, "pg_loss": 0.0, **sums, **weighted, **stats}  # inert rows add exactly 0 to the loss
        if tokens > 0:  # with every row skipped there is nothing to report (0 would read as entropy collapse)
            out["logprob_gap/rollout_vs_learner"] = gap_sum / tokens
            out["entropy"] = entropy_sum / tokens
        out.update({"grad_norm": grad_norm, "lr": self.strategy.lr(), "update/active_tokens": tokens,
                    "update/tokens": 0.0 if batch.standin else float(batch.mask.sum()),
                    "update/rows": 0.0 if batch.standin else float(len(batch)),
                    "update/active_rows": float(active.sum()),
                    # padding the forward passes ran (each micro-batch trimmed to its widest row), and what they would
                    # have run at the step's full width
                    **({"update/padding_frac": 1.0 - real / padded,
                        "update/padding_frac_untrimmed": 1.0 - real / padded_full} if padded else {}),
                    "time/learner_compute": time.perf_counter() - start})
        return out


# ---------------------------------------------------------------------------------------------------------------
# Preference learner
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PreferenceLearner(_Weights):
    """One optimiser step of a preference loss (the DPO family, token-level variants included) per :meth:`step`:
    the mean over the step's pairs, micro-batched. ``tdpo1``/``tdpo2`` get the full-vocabulary logits of policy and
    reference; ``cdpo``/``tgdpo`` their token weights or rewards from the batch's ``extras``."""

    spec: AlgorithmSpec
    strategy: Strategy
    reference: Reference | None = None
    micro_batch_size: int = 64
    precision: Precision = "no"

    def __post_init__(self) -> None:
        if self.spec.preference_loss is None:
            raise ValueError(f"PreferenceLearner needs a preference algorithm, got {self.spec.name!r}")
        self.loss_fn = PREFERENCE_LOSSES.get(self.spec.preference_loss)
        self.needs_logits = bool(PREFERENCE_LOSSES.info(self.spec.preference_loss).get("needs_logits"))

    def _forward(self, model: Any, batch: PairBatch) -> tuple[Tensor, Tensor, Any, Any]:
        with autocast(self.precision, self.strategy.model):
            c_logp, _, c_logits = response_forward(model, batch.prompt_ids, batch.prompt_mask, batch.chosen_ids,
                                                   batch.chosen_mask, return_logits=self.needs_logits)
            r_logp, _, r_logits = response_forward(model, batch.prompt_ids, batch.prompt_mask, batch.rejected_ids,
                                                   batch.rejected_mask, return_logits=self.needs_logits)
        return c_logp, r_logp, c_logits, r_logits

    def _pass(self, batch: PairBatch, *, backward: bool) -> dict[str, float]:
        total = batch.total or len(batch)
        sums: dict[str, float] = {}
        starts = list(range(0, len(batch), self.micro_batch_size))
        count = self.strategy.agree(len(starts))  # every rank runs as many forward passes as the busiest one
        for i in range(count):
            scale = 0.0 if batch.standin or i >= len(starts) else 1.0
            start = starts[i] if i < len(starts) else 0
            part = batch.take(torch.arange(start, min(len(batch), start + self.micro_batch_size)))
            with torch.set_grad_enabled(backward):
                c_logp, r_logp, c_logits, r_logits = self._forward(self.strategy.module, part)
            ref_c = ref_r = ref_c_logits = ref_r_logits = None
            if self.reference is not None:
                with torch.no_grad(), self.reference.model() as ref:
                    ref_c, ref_r, ref_c_logits, ref_r_logits = self._forward(ref, part)
            inputs = PreferenceInputs(chosen_logp=c_logp, rejected_logp=r_logp, chosen_mask=part.chosen_mask,
                                      rejected_mask=part.rejected_mask, ref_chosen_logp=ref_c,
                                      ref_rejected_logp=ref_r)
            kwargs: dict[str, Any] = {**self.spec.preference_kwargs, **part.extras}
            if self.needs_logits:
                kwargs.update(chosen_logits=c_logits, rejected_logits=r_logits, ref_chosen_logits=ref_c_logits,
                              ref_rejected_logits=ref_r_logits)
            per_pair, stats = self.loss_fn(inputs, **kwargs)
            loss = per_pair.sum() / total
            if backward:
                self.strategy.backward(loss * scale, boundary=i == count - 1)
            if scale:
                share = len(part) / len(batch)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + share * float(value)
        sums["update/pairs"] = 0.0 if batch.standin else float(len(batch))
        return sums

    def step(self, batch: PairBatch) -> dict[str, float]:
        start = time.perf_counter()
        self.strategy.model.train()
        stats = self._pass(batch, backward=True)
        stats["grad_norm"] = self.strategy.optimizer_step()
        self.strategy.scheduler_step()
        stats["lr"] = self.strategy.lr()
        stats["time/learner_compute"] = time.perf_counter() - start
        return stats

    def evaluate(self, batch: PairBatch) -> dict[str, float]:
        """The loss and its statistics on held-out pairs, without a gradient."""
        self.strategy.model.eval()
        with torch.no_grad():
            return self._pass(batch, backward=False)


def _row_ends(mask: Tensor) -> Tensor:
    """(B,) each row's length up to and including its last trainable token (holes counted: observations)."""
    return mask.flip(-1).cumsum(-1).flip(-1).gt(0).sum(-1)


class InProcessLearner:
    """The :class:`~align.trainers.protocols.Learner` protocol over one learner in this process (the local runtime;
    the Ray runtime's proxy does the same over several ranks)."""

    def __init__(self, learner: PolicyLearner | PreferenceLearner) -> None:
        self.learner = learner

    def step(self, batch: Any) -> dict[str, float]:
        return merge_stats([self.learner.step(batch)])

    def evaluate(self, batch: PairBatch) -> dict[str, float]:
        assert isinstance(self.learner, PreferenceLearner)
        return merge_stats([self.learner.evaluate(batch)])

    def logprobs(self, batch: Any) -> Tensor:
        assert isinstance(self.learner, PolicyLearner)
        return self.learner.logprobs(batch)

    def ref_logprobs(self, batch: Any) -> Tensor:
        assert isinstance(self.learner, PolicyLearner)
        return self.learner.ref_logprobs(batch)

    def entropy(self, batch: Any) -> Tensor:
        assert isinstance(self.learner, PolicyLearner)
        return self.learner.entropy(batch)

    def values(self, batch: Any) -> Tensor:
        assert isinstance(self.learner, PolicyLearner)
        return self.learner.values(batch)

    def policy_state(self) -> dict[str, Tensor]:
        return self.learner.policy_state()

    def save(self, directory: Path) -> None:
        self.learner.save(directory)

    def load(self, directory: Path) -> None:
        self.learner.load(directory)
