"""Workloads: what one step of the controller loop feeds the learner.

:class:`PolicyWorkload`: prompts -> rollout -> rewards -> filter -> reference / entropy -> credit -> advantages ->
:class:`~align.trainers.learner.PolicyBatch`. :class:`PreferenceWorkload`: pairs -> token credit ->
:class:`~align.trainers.learner.PairBatch`. Both talk to the parts only through the core's protocols, so the same
code runs whether the parts live in this process or behind Ray actors.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from align.advantages import ADVANTAGES, CRITIC_RETURNS, nonuniform_groups
from align.algorithms import AlgorithmSpec
from align.errors import AlignError
from align.losses import StepNormalizer, kl_reward_penalty
from align.ops import last_token_mask, masked_mean
from align.trainers.asynchrony import Chunked, Generation, Ready, staleness_metrics
from align.trainers.learner import OffPolicy, PairBatch, PolicyBatch
from align.trainers.protocols import (
    CreditFunction,
    Learner,
    RewardFunction,
    RewardResult,
    Rollout,
    RolloutEngine,
    SamplingParams,
)
from align.trainers.sampler import PromptSampler


class TrainingStopped(AlignError):
    """The run cannot learn: a reward fails on too many samples, or too many steps in a row had no row to train on.
    One line; ``metrics`` are the failing step's, which the controller logs before it stops."""

    def __init__(self, message: str, metrics: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.metrics = dict(metrics or {})


@dataclass
class Collected:
    """A step's batch for the learner, what was measured while building it, and what the sample log keeps."""

    batch: Any  # PolicyBatch | PairBatch | None (nothing to train on this step)
    metrics: dict[str, float]
    rollout: Rollout | None = None  # the rows trained on
    rewards: Tensor | None = None  # (B,) their sequence rewards
    advantages: Tensor | None = None  # (B, T)
    credit: dict[str, Tensor] = field(default_factory=dict)  # the credit module's (B, T) output, by name


def estimator_inputs(
    spec: AlgorithmSpec,
    batch: Rollout,
    rewards: Tensor,
    *,
    ref_logp: Tensor | None,
    credit_fn: CreditFunction | None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, dict[str, float], dict[str, Tensor]]:
    """What the advantage estimator reads: KL-in-reward penalty and credit module composed.

    rewards: (B,) sequence rewards; ref_logp: (B, T), needed when the KL term sits in the reward. The credit
    module spreads the sequence reward; the KL penalty is added afterwards, so that no module can drop or
    re-weight it. RTO's token reward, for example, is implicit_dpo's clip_c(beta1 (lp_dpo - lp_sft)) + 1[t = last] R
    plus the k1 penalty -beta2 (lp_old - lp_sft). Returns (the estimator's rewards: (B,), or (B, T) token rewards;
    multiplicative credit weights (B, T) or None; metrics; credit by name).
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
    return estimator_input, weights, metrics, credit_out


def estimate_advantages(
    spec: AlgorithmSpec,
    batch: Rollout,
    rewards: Tensor,
    *,
    ref_logp: Tensor | None,
    credit_fn: CreditFunction | None,
    entropy: Tensor | None = None,
    values: Tensor | None = None,
) -> tuple[Tensor, dict[str, float], dict[str, Tensor], Tensor | None]:
    """Advantages (B, T) of a batch: KL-in-reward penalty, credit module (:func:`estimator_inputs`), estimator,
    credit weights.

    values: (B, T) the critic's V_old(s_t) on this batch, for an estimator that reads a critic (gae); the critic's
    targets (GAE: A_t + V_old, before whitening) are then returned too. Returns (advantages, metrics, credit by
    name, returns or None).
    """
    estimator_input, weights, metrics, credit_out = estimator_inputs(spec, batch, rewards, ref_logp=ref_logp,
                                                                     credit_fn=credit_fn, entropy=entropy)
    critic = {} if values is None else {"values": values}
    advantages = ADVANTAGES.get(spec.advantage or "grpo")(estimator_input, batch.mask, batch.group_ids,
                                                          **critic, **spec.advantage_kwargs)
    if weights is not None:
        advantages = advantages * weights
    metrics["advantage/mean"] = float(masked_mean(advantages, batch.mask))
    metrics["advantage/abs_mean"] = float(masked_mean(advantages.abs(), batch.mask))
    returns = None
    if values is not None:
        returns = critic_returns(spec, estimator_input, batch.mask, batch.group_ids, values)
        metrics.update(value_metrics(values, returns, batch.mask))
    return advantages.to(torch.float32), metrics, credit_out, returns


def critic_returns(spec: AlgorithmSpec, rewards: Tensor, mask: Tensor, group_ids: Tensor, values: Tensor) -> Tensor:
    """The critic's regression targets under the spec's estimator (GAE: A_t + V_old(s_t) with the spec's gamma and
    lambda, un-whitened). rewards: (B,) or (B, T); values, mask: (B, T) -> (B, T) float32."""
    assert spec.advantage is not None
    targets = CRITIC_RETURNS[spec.advantage]
    accepted = inspect.signature(targets).parameters
    options = {k: v for k, v in spec.advantage_kwargs.items() if k in accepted}
    return targets(rewards, mask, group_ids, values=values, **options).to(torch.float32)


def value_metrics(values: Tensor, returns: Tensor, mask: Tensor) -> dict[str, float]:
    """The critic before the update, on the rollout: ``value/explained_variance`` 1 - Var[R - V] / Var[R] over the
    batch's tokens (1 = perfect, 0 = no better than a constant, < 0 worse; absent when the returns do not vary; as
    OpenAI baselines' ppo2), ``value/old_mean`` and ``value/returns_mean``. values, returns, mask: (B, T)."""
    v, r = values[mask != 0].double(), returns[mask != 0].double()
    out = {"value/old_mean": float(v.mean()) if v.numel() else 0.0,
           "value/returns_mean": float(r.mean()) if r.numel() else 0.0}
    if r.numel() > 1 and float(r.var(unbiased=False)) > 0:
        out["value/explained_variance"] = 1.0 - float((r - v).var(unbiased=False) / r.var(unbiased=False))
    return out


_COUNTS: tuple[str, ...] = ("submitted", "drawn", "stale_dropped", "trained")  # PolicyWorkload's rows, cumulative


@dataclass
class PolicyWorkload:
    """Sampled prompts, scored and turned into advantages. ``max_staleness`` k (``overlap``: 1): up to k generation
    batches are sampled ahead, before the updates, and rows more than k versions old are dropped; the learner
    importance-weights the stale rows (``is_level``/``is_cap``). ``partial_chunk_tokens``: partial rollouts, a batch in
    flight sampled that many tokens per weight version (:mod:`align.trainers.asynchrony`)."""

    spec: AlgorithmSpec
    engine: RolloutEngine
    rewards: RewardFunction
    learner: Learner
    prompts: Sequence[str]
    columns: dict[str, Sequence[Any]]
    sampler: PromptSampler
    prompts_per_step: int
    samples_per_prompt: int
    sampling: SamplingParams
    credit: CreditFunction | None = None
    accuracy_reward: str | None = None  # a 0/1 verifier among the rewards, reported as "accuracy"
    overlap: bool = False
    is_level: OffPolicy = "token"
    is_cap: float = 2.0
    # algorithm.rollout_correction: an align.losses.RolloutCorrection applied on every step (is_level/is_cap then
    # unused); None: overlap's stale rows get tis (is_level token) or geo_tis (sequence) capped at is_cap
    rollout_correction: Any = None
    # recipe guards: the share of a step's samples one reward may fail on, and how many steps in a row may have no
    # row to train on (None: any number), before the run stops with a one-line error
    max_reward_failure_share: float = 0.5
    max_empty_steps: int | None = 3
    # Long Horizon Temperature Scaling (arXiv 2302.03686; align/trainers/resampling.py): draw
    # long_horizon_candidates x samples_per_prompt completions at temperature 1 and resample samples_per_prompt of
    # them towards p(y|x)^(1/T); None: sample as the engine does
    long_horizon_temperature: float | None = None
    long_horizon_candidates: int = 1
    # DAPO dynamic sampling with refill (drop_uniform_groups): generation batches per step, the first included
    max_generation_batches: int = 1
    log: Callable[[str], None] | None = None  # one-line warnings (a step dynamic sampling could not fill)
    _warned_unfilled: bool = False
    # asynchronous rollouts (align/trainers/asynchrony.py): generation batches sampled up to max_staleness policy
    # versions ahead of the update that trains on them (overlap: true is 1); partial rollouts sample a batch in
    # flight partial_chunk_tokens at a time, one chunk per weight version (None: whole), through generate_tokens,
    # with the tokenizer encoding prompts and decoding completions
    max_staleness: int = 0
    partial_chunk_tokens: int | None = None
    tokenizer: Any = None
    _queue: deque[Generation] = field(default_factory=deque)  # in flight, oldest first
    # cumulative rows: submitted to the engine, drawn by a step, dropped past the staleness bound, trained on
    _counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0))
    _empty_steps: int = 0  # consecutive, up to this one

    def _submit(self, prompts_count: int | None = None) -> Generation:
        """A generation batch of the next ``prompts_count`` prompts (default ``prompts_per_step``), started now at
        the engine's current weights (on Ray it samples while the driver goes on); ``.result()`` completes it,
        sampling what is left at the weights current then, and returns its :class:`Rollout`."""
        index = self.sampler.next(self.prompts_per_step if prompts_count is None else prompts_count)
        prompts = [self.prompts[i] for i in index]
        columns = {k: [v[i] for i in index] for k, v in self.columns.items()}
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the controller's RNG: a resumed run samples the same
        lhts = self.long_horizon_temperature
        samples = self.samples_per_prompt * (1 if lhts is None else self.long_horizon_candidates)
        rows = len(prompts) * self.samples_per_prompt
        self._counts["submitted"] += rows
        if self.partial_chunk_tokens is not None:
            if lhts is not None:
                raise AlignError("runtime.partial_rollouts cannot resample long-horizon candidates "
                                 "(rollout.long_horizon_temperature): remove one of the two")
            chunked = Chunked(self.engine, self.tokenizer, prompts=prompts, columns=columns,
                              samples_per_prompt=samples, params=self.sampling, seed=seed,
                              chunk_tokens=self.partial_chunk_tokens)
            chunked.advance()  # the first chunk, at the current weights
            return Generation(rows=rows, chunked=chunked, on_result=self._drawn)
        submit = getattr(self.engine, "submit", None)
        pending = (submit(prompts, columns, samples_per_prompt=samples, params=self.sampling, seed=seed)
                   if submit is not None else
                   Ready(self.engine.generate(prompts, columns, samples_per_prompt=samples, params=self.sampling,
                                              seed=seed)))
        resample = None if lhts is None else {"temperature": lhts, "samples_per_prompt": self.samples_per_prompt,
                                              "seed": seed}
        return Generation(rows=rows, pending=pending, resample=resample, on_result=self._drawn)

    def _drawn(self, rows: int) -> None:
        self._counts["drawn"] += rows

    def _depth(self) -> int:
        """How many generation batches may be in flight ahead of this step (the staleness bound)."""
        return max(self.max_staleness, int(self.overlap))

    def _take(self, prefetch: int, top_up: bool = True) -> Generation:
        """This step's generation batch: the oldest in flight (or one started now), its remainder queued first at
        the current weights; then (``top_up``) :meth:`_top_up`."""
        head = self._queue.popleft() if self._queue else self._submit()
        head.finish()
        if top_up:
            self._top_up(prefetch)
        return head

    def _top_up(self, prefetch: int) -> None:
        """Every batch still in flight advances one chunk (partial rollouts) and new ones start, up to
        ``max_staleness`` ahead but for no more steps than the run has left (``prefetch``). With DAPO refill this
        runs after the refill: the engine runs calls in order (the Ray worker), so a refill submitted behind the
        prefetched batches would wait for them while the learner idles."""
        for ahead in self._queue:
            ahead.advance()
        while len(self._queue) < min(self._depth(), int(prefetch)):
            self._queue.append(self._submit())

    def _within_bound(self, rollout: Rollout, version: int) -> tuple[Rollout, dict[str, float]]:
        """The rows at most ``max_staleness`` versions old; the rest are dropped and counted. A batch with no row
        left (a run resumed with a smaller bound) is replaced by one sampled now."""
        fresh, metrics = staleness_metrics(rollout, version, self._depth())
        dropped = int((~fresh).sum())
        self._counts["stale_dropped"] += dropped
        if dropped and bool(fresh.any()):
            kept = rollout.select(fresh)
            rollout = replace(kept, weight_version=int(kept.row_versions().min()))
        elif dropped:
            rollout = self._submit().result()
        if not (self._depth() or dropped or metrics["async/staleness_max"]):
            return rollout, {}  # on-policy: nothing to report
        metrics.update(self._in_flight_metrics())
        return rollout, metrics

    def _in_flight_metrics(self) -> dict[str, float]:
        return {"async/in_flight": float(len(self._queue)),
                "async/in_flight_samples": float(sum(g.rows for g in self._queue))}

    def collect(self, step: int, version: int, prefetch: int) -> Collected:
        """This step's batch. ``prefetch``: how many steps the run has left after this one (0 on the last); with
        ``max_staleness`` k, min(k, prefetch) generation batches are in flight after this call, started before
        this step's update. A checkpoint stores them (:meth:`state_dict`), so a resumed run trains on exactly what
        an uninterrupted one does, and nothing is in flight when the run ends.

        Counts (cumulative, under ``max_staleness``): ``async/samples_submitted`` = ``samples_drawn`` +
        ``in_flight_samples``, and every drawn sample is trained (``samples_trained``), dropped past the bound
        (``samples_stale_dropped``) or left out by the rewards' filters, once."""
        collected = self._collect(step, version, prefetch)
        if collected.batch is not None and collected.rollout is not None:
            self._counts["trained"] += len(collected.rollout)
        if "async/in_flight" in collected.metrics:
            collected.metrics.update({f"async/samples_{k}": float(v) for k, v in self._counts.items()})
        return collected

    def _collect(self, step: int, version: int, prefetch: int) -> Collected:
        """:meth:`collect` before the counts are added."""
        start = time.perf_counter()
        refill = self.spec.drop_uniform_groups and self.max_generation_batches > 1
        pending = self._take(prefetch, top_up=not refill)
        rollout: Rollout = pending.result()
        metrics: dict[str, float] = {"time/rollout": time.perf_counter() - start,
                                     "time/generate": rollout.timings.get("generate", time.perf_counter() - start)}
        metrics.update(pending.metrics)  # lhts/ess, lhts/ess_frac, lhts/unique_frac (long-horizon temperature)
        rollout, staleness = self._within_bound(rollout, version)
        metrics.update(staleness)  # async/*
        reward_start = time.perf_counter()
        result = self.rewards(rollout, step)
        metrics["time/reward"] = time.perf_counter() - reward_start
        metrics.update(result.metrics)
        metrics.update(self._rollout_metrics(rollout, result.per_reward))
        lag = int((version - rollout.row_versions()).max())  # the oldest row's: 0 on-policy, max_staleness at most
        metrics["off_policy_lag"] = float(lag)
        keep = self._trainable_rows(rollout, result)
        if self.spec.drop_uniform_groups and bool(result.valid.any()):
            metrics["filter/uniform_group_frac"] = 1.0 - float(keep[result.valid].float().mean())
        metrics["filter/kept_frac"] = float(keep.float().mean())
        self._stop_if_a_reward_fails(result, step, metrics)
        if self.spec.drop_uniform_groups:
            rollout, result, keep = self._refill(rollout, result, keep, step, metrics)
        if refill:
            self._top_up(prefetch)
            if "async/in_flight" in metrics:
                metrics.update(self._in_flight_metrics())
        if not bool(keep.any()):
            self._stop_after_empty_steps(result, step, metrics)
            return Collected(None, metrics)
        self._empty_steps = 0
        batch = rollout.select(keep)
        lag = int((version - batch.row_versions()).max())  # of the rows trained on
        rewards = result.rewards[keep]
        ref_logp = None
        if self.spec.kl is not None:  # no forward (nor Ray round trip) when nothing reads a reference
            reference_start = time.perf_counter()
            ref_logp = self.learner.ref_logprobs(batch)
            metrics["time/reference"] = time.perf_counter() - reference_start
        entropy = self.learner.entropy(batch) if getattr(self.credit, "needs_entropy", False) else None
        values = None
        if self.spec.value_loss is not None:  # V_old: the critic on this rollout, before the update
            critic_start = time.perf_counter()
            values = self.learner.values(batch)
            metrics["time/critic"] = time.perf_counter() - critic_start
        advantages, extra, credit, returns = estimate_advantages(self.spec, batch, rewards, ref_logp=ref_logp,
                                                                 credit_fn=self.credit, entropy=entropy,
                                                                 values=values)
        metrics.update(extra)
        in_loss = self.spec.kl is not None and self.spec.kl_placement == "loss"
        train = PolicyBatch(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask,
                            completion_ids=batch.completion_ids, mask=batch.mask, logp=batch.logp,
                            advantages=advantages, group_ids=batch.group_ids,
                            normalizer=StepNormalizer.from_masks(batch.mask,
                                                                 generation_budget=self.spec.generation_budget),
                            ref_logp=ref_logp if in_loss else None,
                            correction=PolicyBatch.correction_for(lag, self.rollout_correction, self.is_level,
                                                                  self.is_cap),
                            old_values=values, returns=returns)
        return Collected(train, metrics, batch, rewards, advantages, credit)

    def _trainable_rows(self, rollout: Rollout, result: RewardResult) -> Tensor:
        """(B,) bool: rows the rewards scored, in groups whose rewards differ when the algorithm drops uniform
        groups (DAPO dynamic sampling)."""
        keep = result.valid.clone()
        if self.spec.drop_uniform_groups and bool(keep.any()):
            filled = torch.where(keep, result.rewards, torch.zeros_like(result.rewards))
            informative = nonuniform_groups(filled[keep], rollout.mask[keep], rollout.group_ids[keep])
            keep[keep.nonzero().squeeze(-1)[~informative]] = False
        return keep

    def _refill(self, rollout: Rollout, result: RewardResult, keep: Tensor, step: int,
                metrics: dict[str, float]) -> tuple[Rollout, RewardResult, Tensor]:
        """DAPO dynamic sampling with refill (arXiv 2503.14476 §3.2, Algorithm 1 lines 6-8; verl ``filter_groups``):
        draw further generation batches of fresh prompts, at the current weights, until the step holds
        ``prompts_per_step`` informative groups or ``max_generation_batches`` batches were drawn; keep the first
        ``prompts_per_step`` informative groups in draw order. A step that cannot fill trains on what it has (warned
        once, ``dynamic_sampling/unfilled`` 1).

        Departure from verl, which draws whole generation batches: a refill batch holds the missing groups at the
        informative rate seen so far in this step, plus one (``prompts_per_step`` at most, and all of it while no
        group was informative), so a step short of one group samples a few prompts, not a full batch that is then
        mostly discarded. On the tiny arithmetic task whole batches discarded 26-32% of the samples drawn.

        Metrics (shares of every completion the step sampled): ``dynamic_sampling/wasted_frac`` in groups that
        cannot train (uniform, or dropped by the rewards), ``dynamic_sampling/discarded_frac`` in informative
        groups beyond the step's need. The reward and accuracy metrics stay those of the first batch, an unbiased
        sample of the policy. keep: (B,) bool of the first batch; returns the step's rollout, scores and keep."""
        need = self.prompts_per_step
        parts = [(rollout, result, keep)]
        have, drawn = _groups(rollout, keep), int(rollout.group_ids.unique().numel())
        start = time.perf_counter()
        while have < need and len(parts) < self.max_generation_batches:
            size = need if have == 0 else min(need, math.ceil((need - have) * drawn / have) + 1)
            drawn += size
            extra: Rollout = self._submit(size).result()
            scored = self.rewards(extra, step)
            self._stop_if_a_reward_fails(scored, step, {**metrics, **scored.metrics})
            extra_keep = self._trainable_rows(extra, scored)
            parts.append((extra, scored, extra_keep))
            have += _groups(extra, extra_keep)
        if len(parts) > 1:
            metrics["time/refill"] = time.perf_counter() - start
            rollout = Rollout.concat([r for r, _, _ in parts])
            result = RewardResult(rewards=torch.cat([s.rewards for _, s, _ in parts]),
                                  valid=torch.cat([s.valid for _, s, _ in parts]),
                                  per_reward={k: torch.cat([s.per_reward[k] for _, s, _ in parts])
                                              for k in result.per_reward},
                                  metrics=result.metrics, failures=result.failures)
            keep = torch.cat([k for _, _, k in parts])
        informative = keep.clone()
        # the first `need` informative groups in draw order; the rest were sampled for nothing
        kept_groups = rollout.group_ids[keep].unique_consecutive()[:need]
        keep &= torch.isin(rollout.group_ids, kept_groups)
        sampled = float(len(keep))
        metrics.update({
            "dynamic_sampling/generation_batches": float(len(parts)),
            "dynamic_sampling/groups": float(len(kept_groups)),
            "dynamic_sampling/filled_frac": len(kept_groups) / need,
            "dynamic_sampling/wasted_frac": float((~informative).sum()) / sampled,
            "dynamic_sampling/discarded_frac": float((informative & ~keep).sum()) / sampled,
            "dynamic_sampling/unfilled": float(len(kept_groups) < need),
        })
        if len(kept_groups) < need and bool(keep.any()) and self.log is not None and not self._warned_unfilled:
            self._warned_unfilled = True
            self.log(f"step {step}: dynamic sampling found {len(kept_groups)} of {need} informative groups in "
                     f"{len(parts)} generation batches (algorithm.max_generation_batches: "
                     f"{self.max_generation_batches}); training on those. Later short steps are counted in "
                     "dynamic_sampling/unfilled, not warned again")
        return rollout, result, keep

    def _stop_if_a_reward_fails(self, result: RewardResult, step: int, metrics: dict[str, float]) -> None:
        """A reward failing on most samples is a broken reward or a bad option, not noise: train on, and the run
        learns from the other rewards alone, or from nothing."""
        size = len(result.valid)
        for name in result.per_reward:
            failed = result.metrics.get(f"reward/{name}/failed", 0.0)
            if size and failed / size > self.max_reward_failure_share:
                first = result.failures.get(name, "the reward's warning in the log says how")
                raise TrainingStopped(
                    f"reward {name!r} failed on {failed:g} of {size} samples at step {step}, more than "
                    f"guards.max_reward_failure_share ({self.max_reward_failure_share:g}); first failure: {first}; "
                    "fix the reward or its options, or set guards.max_reward_failure_share: 1.0 to train on what "
                    "it does score", metrics)

    def _stop_after_empty_steps(self, result: RewardResult, step: int, metrics: dict[str, float]) -> None:
        """A step with no row to train on leaves the policy as it was, so the next step draws from the same
        distribution: a few in a row can be chance early on, many in a row will not end by themselves."""
        self._empty_steps += 1
        if self.max_empty_steps is None or self._empty_steps <= self.max_empty_steps:
            return
        size, dropped = len(result.valid), int((~result.valid).sum())
        if dropped == size:
            unscored = [f"{name!r} on {int(torch.isnan(values).sum())}" for name, values in result.per_reward.items()
                        if bool(torch.isnan(values).any())]
            why = ("every sample was dropped by the rewards" if not unscored else
                   f"every sample was dropped: no value (None or a failure) from {', '.join(unscored)}")
        else:
            why = (f"{dropped} of {size} samples were dropped by the rewards and every group left had the same "
                   f"reward for all its samples, which {self.spec.name} leaves out (drop_uniform_groups)")
        raise TrainingStopped(
            f"{self._empty_steps} steps in a row had no row to train on, so the policy never changed (step {step}: "
            f"{why}); check that the rewards can tell completions apart (e.g. that an extract mode matches what the "
            f"model writes), or allow more with guards.max_empty_steps (now {self.max_empty_steps}; null never "
            "stops)", metrics)

    def _rollout_metrics(self, rollout: Rollout, per_reward: dict[str, Tensor]) -> dict[str, float]:
        lengths = rollout.mask.sum(-1)
        metrics = {
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            # multi-turn rows have holes (observations) in the mask: their engine says which were cut
            "response_length/clipped_frac": float(torch.tensor(rollout.columns["truncated"]).float().mean())
            if "observation_tokens" in rollout.columns and "truncated" in rollout.columns
            else float((rollout.mask[:, -1] != 0).float().mean())
            if rollout.mask.shape[1] >= self.sampling.max_new_tokens else 0.0,
        }
        name = self.accuracy_reward
        if name is not None and name in per_reward:
            values = per_reward[name]
            good = torch.isfinite(values)
            metrics["accuracy"] = float((values[good] >= 1.0 - 1e-9).float().mean()) if bool(good.any()) else math.nan
            # Dr. GRPO (arXiv 2503.20783 §3.1) reads GRPO's length bias off the wrong answers' length
            right = good & (values >= 1.0 - 1e-9)
            wrong = good & ~right
            for key, rows in (("correct", right), ("incorrect", wrong)):
                if bool(rows.any()):
                    metrics[f"response_length/{key}_mean"] = float(lengths[rows].float().mean())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The data order, the counts, and the generation batches in flight, each resolved (a call being sampled
        finishes at its own version) and stored as JSON values and tensors; the run goes on from exactly what is
        stored (:meth:`Generation.state_dict`)."""
        return {"sampler": self.sampler.state_dict(), "empty_steps": self._empty_steps, "counts": dict(self._counts),
                "in_flight": [g.state_dict() for g in self._queue]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self._empty_steps = int(state.get("empty_steps", 0))
        self._counts = {**dict.fromkeys(_COUNTS, 0), **state.get("counts", {})}
        self._queue = deque(Generation.from_state(g, engine=self.engine, tokenizer=self.tokenizer,
                                                  on_result=self._drawn) for g in state.get("in_flight", []))



def _groups(rollout: Rollout, rows: Tensor) -> int:
    """How many distinct groups the rows ``rows`` (B,) bool touch."""
    return int(rollout.group_ids[rows].unique().numel())


TokenCredit = Callable[[PairBatch], dict[str, Tensor]]
"""(pairs) -> the token-level loss's extra inputs (cDPO's ``rejected_weights``, TGDPO's token rewards)."""


@dataclass
class PreferenceWorkload:
    """Pairs in a seeded order, tokenised, with token credit for the token-level losses."""

    pairs: Any  # a dataset with prompt / chosen / rejected
    tokenize: Callable[[Sequence[Any], Sequence[Any], Sequence[Any]], PairBatch]
    sampler: PromptSampler
    pairs_per_step: int
    token_credit: TokenCredit | None = None

    def batch(self, rows: Any) -> PairBatch:
        pairs = self.tokenize(rows["prompt"], rows["chosen"], rows["rejected"])
        if self.token_credit is not None:
            pairs = PairBatch(pairs.prompt_ids, pairs.prompt_mask, pairs.chosen_ids, pairs.chosen_mask,
                              pairs.rejected_ids, pairs.rejected_mask, self.token_credit(pairs))
        return pairs

    def collect(self, step: int, version: int, prefetch: int) -> Collected:
        return Collected(self.batch(self.pairs.select(self.sampler.next(self.pairs_per_step))), {})

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
