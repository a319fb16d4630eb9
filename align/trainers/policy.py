"""The on-policy RL loop: rollout -> reward -> credit -> advantage -> update -> weight sync.

One optimiser step per rollout batch (``updates_per_batch`` > 1 re-uses the batch off-policy). Micro-batches hold
whole groups and share one :class:`~align.losses.StepNormalizer`, so gradient accumulation never changes the
gradient. The first update reuses the rollout log-probs as pi_old; the reference model is run only when a KL term
needs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from align.advantages import ADVANTAGES, nonuniform_groups
from align.algorithms import AlgorithmSpec
from align.losses import PolicyInputs, StepNormalizer, kl_reward_penalty
from align.objective import active_rows, policy_step_loss
from align.ops import last_token_mask, masked_mean
from align.trainers.precision import Precision, autocast
from align.trainers.protocols import CreditFunction, RewardFunction, Rollout, RolloutEngine, SamplingParams
from align.trainers.sampler import PromptSampler
from align.trainers.sequences import response_forward

ReferenceFn = Callable[[Rollout], Tensor]


@dataclass
class PolicyLoopConfig:
    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    sampling: SamplingParams
    micro_batch_size: int = 64
    updates_per_batch: int = 1
    max_grad_norm: float | None = 1.0
    accuracy_reward: str | None = None  # a 0/1 verifier among the rewards, reported as "accuracy"
    precision: Precision = "no"  # "bf16": forward passes (sampling included) under bf16 autocast


@dataclass
class StepOutput:
    metrics: dict[str, float]
    rollout: Rollout | None = None  # the rows trained on
    rewards: Tensor | None = None  # (B,) their sequence rewards
    advantages: Tensor | None = None  # (B, T)
    credit: dict[str, Tensor] = field(default_factory=dict)  # the credit module's (B, T) output, by name


@dataclass
class PolicyTrainer:
    spec: AlgorithmSpec
    model: Any
    engine: RolloutEngine
    reward_fn: RewardFunction
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: PolicyLoopConfig
    prompts: Sequence[str]
    columns: dict[str, Sequence[Any]]
    sampler: PromptSampler
    reference: ReferenceFn | None = None
    credit_fn: CreditFunction | None = None
    credit_needs_entropy: bool = False
    version: int = 0
    _params: list[torch.nn.Parameter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if self.spec.kind != "policy":
            raise ValueError(f"PolicyTrainer needs a policy algorithm, got {self.spec.name!r} ({self.spec.kind})")
        if self.spec.kl is not None and self.reference is None:
            raise ValueError(f"algorithm {self.spec.name!r} has a KL term but no reference model was given")

    # -- one step ----------------------------------------------------------------------------------------------
    def step(self, step: int) -> StepOutput:
        start = time.perf_counter()
        rollout = self._sample()
        rollout_time = time.perf_counter() - start
        result = self.reward_fn(rollout, step)
        metrics: dict[str, float] = dict(result.metrics)
        metrics.update(self._rollout_metrics(rollout, result.per_reward))
        keep = result.valid.clone()
        if self.spec.drop_uniform_groups and bool(keep.any()):
            filled = torch.where(keep, result.rewards, torch.zeros_like(result.rewards))
            informative = nonuniform_groups(filled[keep], rollout.mask[keep], rollout.group_ids[keep])
            kept_rows = keep.nonzero().squeeze(-1)
            keep[kept_rows[~informative]] = False
            metrics["filter/uniform_group_frac"] = 1.0 - float(informative.float().mean())
        metrics["filter/kept_frac"] = float(keep.float().mean())
        if not bool(keep.any()):
            metrics.update(self._timing(start, rollout_time, 0.0, 0))
            return StepOutput(metrics)
        batch = rollout.select(keep)
        rewards = result.rewards[keep]
        update_start = time.perf_counter()
        advantages, ref_logp, extra, credit = self._advantages(batch, rewards)
        metrics.update(extra)
        metrics.update(self._update(batch, advantages, ref_logp))
        self.version += 1
        self.engine.sync_weights(self.model, self.version)
        metrics["weight_version"] = float(self.version)
        tokens = int(batch.mask.sum())
        metrics.update(self._timing(start, rollout_time, time.perf_counter() - update_start, tokens))
        return StepOutput(metrics, batch, rewards, advantages, credit)

    def _sample(self) -> Rollout:
        index = self.sampler.next(self.config.prompts_per_step)
        prompts = [self.prompts[i] for i in index]
        columns = {k: [v[i] for i in index] for k, v in self.columns.items()}
        # the in-process engine samples under the same autocast as the update, so pi_old matches the learner
        with autocast(self.config.precision, self.model):
            return self.engine.generate(prompts, columns, samples_per_prompt=self.config.samples_per_prompt,
                                        params=self.config.sampling)

    def _advantages(self, batch: Rollout,
                    rewards: Tensor) -> tuple[Tensor, Tensor | None, dict[str, float], dict[str, Tensor]]:
        ref_logp = None
        if self.spec.kl is not None:
            assert self.reference is not None
            with torch.no_grad(), autocast(self.config.precision, self.model):
                ref_logp = self.reference(batch)
        entropy = self._entropy(batch) if self.credit_fn is not None and self.credit_needs_entropy else None
        advantages, metrics, credit = estimate_advantages(self.spec, batch, rewards, ref_logp=ref_logp,
                                                          credit_fn=self.credit_fn, entropy=entropy)
        return advantages, ref_logp, metrics, credit

    @torch.no_grad()
    def _entropy(self, batch: Rollout) -> Tensor:
        with autocast(self.config.precision, self.model):
            _, entropy, _ = response_forward(self.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                             batch.mask, temperature=self.config.sampling.temperature,
                                             with_entropy=True)
        assert entropy is not None
        return entropy

    def _micro_batches(self, batch: Rollout, active: Tensor) -> list[Tensor]:
        """Row indices of micro-batches made of whole active groups (GTPO's conflict weights need the group)."""
        groups = batch.group_ids[active].unique_consecutive()
        per_micro = max(1, self.config.micro_batch_size // max(1, self.config.samples_per_prompt))
        out = []
        for s in range(0, len(groups), per_micro):
            members = torch.isin(batch.group_ids, groups[s : s + per_micro]) & active
            out.append(members.nonzero().squeeze(-1))
        return out

    def _update(self, batch: Rollout, advantages: Tensor, ref_logp: Tensor | None) -> dict[str, float]:
        spec, temperature = self.spec, self.config.sampling.temperature
        normalizer = StepNormalizer.from_masks(batch.mask, generation_budget=spec.generation_budget)
        sums: dict[str, float] = {}
        weighted: dict[str, float] = {}
        # groups with all-zero advantages are skipped when that is exact (binary rewards leave many such groups:
        # every sample right or every sample wrong), a forward and backward other trainers run to add zeros
        active = active_rows(spec, advantages, batch.mask, batch.group_ids)
        micro_batches = self._micro_batches(batch, active)
        # per-token metrics (entropy, ratio stats, log-prob gap) are over the rows that went through the model
        gap_sum, entropy_sum, tokens = 0.0, 0.0, float(batch.mask[active].sum())
        grad_norm = 0.0
        # eval mode: dropout would make pi_theta differ from the pi_old that sampled (ratio != 1 at mu = 1);
        # gradients flow as usual
        self.model.eval()
        for update in range(self.config.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            for rows in micro_batches:
                mask = batch.mask[rows]
                with autocast(self.config.precision, self.model):
                    logp, entropy, _ = response_forward(self.model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                                        batch.completion_ids[rows], mask, temperature=temperature,
                                                        with_entropy=True)
                inputs = PolicyInputs(logp=logp, old_logp=batch.logp[rows], advantages=advantages[rows], mask=mask,
                                      token_ids=batch.completion_ids[rows], group_ids=batch.group_ids[rows],
                                      entropy=entropy)
                loss, stats = policy_step_loss(spec, inputs, normalizer,
                                               ref_logp=None if ref_logp is None else ref_logp[rows])
                loss.backward()
                if update == 0:
                    share = float(mask.sum()) / max(tokens, 1.0)
                    for key, value in stats.items():
                        if key in ("loss", "pg_loss", "kl"):
                            sums[key] = sums.get(key, 0.0) + float(value)
                        else:
                            weighted[key] = weighted.get(key, 0.0) + share * float(value)
                    gap_sum += float(((logp.detach() - batch.logp[rows]).abs() * mask).sum())
                    assert entropy is not None
                    entropy_sum += float((entropy * mask).sum())
            if not micro_batches:  # every row inert: the gradient is exactly zero, and the optimiser still steps
                for p in self._params:
                    p.grad = torch.zeros_like(p)
            if self.config.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, self.config.max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in self._params if p.grad is not None])))
            self.optimizer.step()
        self.scheduler.step()
        metrics = {"loss": 0.0, "pg_loss": 0.0, **sums, **weighted}  # inert rows add exactly 0 to the loss
        if tokens > 0:  # with every row skipped there is nothing to report (0 would read as entropy collapse)
            metrics["logprob_gap/rollout_vs_learner"] = gap_sum / tokens
            metrics["entropy"] = entropy_sum / tokens
        metrics["grad_norm"] = grad_norm
        metrics["update/skipped_rows_frac"] = 1.0 - float(active.float().mean())
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return metrics

    def _rollout_metrics(self, rollout: Rollout, per_reward: dict[str, Tensor]) -> dict[str, float]:
        lengths = rollout.mask.sum(-1)
        metrics = {
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response_length/clipped_frac": float((rollout.mask[:, -1] != 0).float().mean())
            if rollout.mask.shape[1] >= self.config.sampling.max_new_tokens else 0.0,
        }
        name = self.config.accuracy_reward
        if name is not None and name in per_reward:
            values = per_reward[name]
            good = torch.isfinite(values)
            metrics["accuracy"] = float((values[good] >= 1.0 - 1e-9).float().mean()) if bool(good.any()) else math.nan
        return metrics

    @staticmethod
    def _timing(start: float, rollout_time: float, update_time: float, tokens: int) -> dict[str, float]:
        total = time.perf_counter() - start
        return {"time/step": total, "time/rollout": rollout_time, "time/update": update_time,
                "throughput/tokens_per_s": tokens / total if total > 0 else 0.0}


def estimate_advantages(
    spec: AlgorithmSpec,
    batch: Rollout,
    rewards: Tensor,
    *,
    ref_logp: Tensor | None,
    credit_fn: CreditFunction | None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
    """Advantages (B, T) of a batch: KL-in-reward penalty, credit module, estimator, credit weights.

    rewards: (B,) sequence rewards; ref_logp: (B, T), needed when the KL term sits in the reward. The credit
    module spreads the sequence reward; the KL penalty is added afterwards, so that no module can drop or
    re-weight it. Shared by the local loop and the Ray driver. Returns (advantages, metrics, credit by name).
    """
    metrics: dict[str, float] = {}
    credit_out: dict[str, Tensor] = {}
    estimator_input: Tensor = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    token_rewards = None
    if spec.kl is not None and spec.kl_placement == "reward":
        assert ref_logp is not None
        token_rewards = kl_reward_penalty(batch.logp, ref_logp, batch.mask, coef=spec.kl_coef, estimator=spec.kl)
        metrics["kl_reward_penalty"] = float(token_rewards.sum(-1).mean())
        terminal = torch.where(last_token_mask(batch.mask), estimator_input.unsqueeze(-1), 0.0)
        estimator_input = terminal + token_rewards
    weights = None
    if credit_fn is not None:
        credit = credit_fn(batch, rewards, logp=batch.logp, entropy=entropy, token_rewards=None)
        credit_out[spec.credit or "credit"] = credit.values
        if credit.output == "rewards":
            estimator_input = credit.values.to(torch.float32)
            if token_rewards is not None:
                estimator_input = estimator_input + token_rewards
        else:
            weights = credit.values.to(torch.float32)
    advantages = ADVANTAGES.get(spec.advantage or "grpo")(estimator_input, batch.mask, batch.group_ids,
                                                          **spec.advantage_kwargs)
    if weights is not None:
        advantages = advantages * weights
    metrics["advantage/mean"] = float(masked_mean(advantages, batch.mask))
    metrics["advantage/abs_mean"] = float(masked_mean(advantages.abs(), batch.mask))
    return advantages.to(torch.float32), metrics, credit_out
