"""The Ray runtime: it places a run's parts behind Ray actors, with proxies that speak the core's protocols, so the
core's controller loop (:mod:`align.trainers.controller`) drives them exactly as it drives the local parts.

One placement group per run: bundle 0 the rollout worker, then ``runtime.learners`` DeepSpeed ranks, then
``runtime.reward_workers`` reward workers (GPU bundles where GPUs exist), plus one actor per auxiliary model a credit
module names. A rollout or reward worker that dies is replaced (the rollout worker resynced) and the call retried; a
learner rank that dies stops the run cleanly with the command that resumes it from its last checkpoint.
``ray job submit ... -- align train recipe.yaml`` connects to the cluster (``RAY_ADDRESS``); without an address an
embedded local Ray is started.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray

from align.build import policy_model
from align.components import Parts, RunPlan
from align.config import Recipe, RecipeError
from align.trainers.policy_scorer import POLICY, LearnerScorer
from ray_jobs.actors import AuxModelWorker, LearnerRank, RemoteScorer, load_weights
from ray_jobs.group import LearnerGroup
from ray_jobs.placement import Placement, connect, free_port
from ray_jobs.reward_pool import RewardPool
from ray_jobs.rollout_service import RolloutService


class RayRuntime:
    """:class:`align.components.Runtime` placing the parts behind Ray actors."""

    refused: Mapping[str, str] = {}  # every recipe key means on Ray what it means locally

    def check(self, recipe: Recipe) -> None:
        rt = recipe.runtime
        if recipe.lora.enabled and (rt.weight_sync == "broadcast" or rt.zero_stage == 3):
            raise RecipeError("recipe key 'lora.enabled': on Ray, LoRA syncs its adapter through the object store "
                              "with ZeRO stage 0-2; set runtime.weight_sync: object_store and zero_stage <= 2")
        if rt.weight_sync == "broadcast" and rt.zero_stage == 3:
            raise RecipeError("recipe key 'runtime.weight_sync': broadcast sends rank 0's parameters, which ZeRO-3 "
                              "partitions; use object_store with zero_stage 3, or zero_stage 2")

    def place(self, plan: RunPlan) -> Parts:
        recipe, spec = plan.recipe, plan.spec
        connect(recipe)
        policy_run = spec.kind == "policy"
        placement = Placement(recipe, policy=policy_run)
        actors: list[Any] = []
        closers: list[Callable[[], None]] = [lambda: [ray.kill(a, no_restart=True) for a in actors],
                                             placement.close]
        try:
            port = free_port()
            ranks = [LearnerRank.options(num_cpus=0.5, num_gpus=placement.gpu,
                                         scheduling_strategy=placement.bundle(placement.learner(rank)))
                     .remote(recipe, spec, str(plan.base), rank, recipe.runtime.learners, port)
                     for rank in range(recipe.runtime.learners)]
            actors.extend(ranks)
            learners = LearnerGroup(ranks, recipe.runtime.zero_stage)

            def load_scorer(path: str) -> Any:
                if path == POLICY:  # the weights being trained, scored by the learner ranks
                    return LearnerScorer(learners)
                actor = AuxModelWorker.options(num_cpus=0.25).remote(str(plan.base) if path == "base" else path,
                                                                     recipe.runtime.threads or 1)
                actors.append(actor)
                return RemoteScorer(actor)

            policy = DriverPolicy(plan.base, recipe, learners)
            parts = Parts(learner=learners, policy=policy)
            if policy_run:
                rollout = RolloutService(recipe, plan.base, placement, learners)
                pool = RewardPool(recipe, placement)
                closers[:0] = [rollout.close, pool.close]
                parts.engine = parts.sync = rollout  # type: ignore[assignment]
                parts.rewards = pool
                parts.credit = plan.rewards.credit_function(recipe, load_scorer)
            else:
                parts.token_credit = plan.rewards.token_credit(recipe, spec, load_scorer)
            ray.get([r.pid.remote() for r in ranks])  # the ranks are up (a failure shows here, not mid-step)
        except BaseException:
            _close(closers)
            raise
        parts.close = lambda: _close(closers)
        return parts


class DriverPolicy:
    """The driver's copy of the policy (for evaluation and the final model), loaded with the learner's weights at
    most once per weight version."""

    def __init__(self, base: Path, recipe: Recipe, learners: LearnerGroup) -> None:
        self.model, _ = policy_model(base, recipe)
        self.model.eval()
        self.learners = learners
        self.loaded: int | None = None

    def __call__(self) -> Any:
        if self.loaded != self.learners.changes:
            load_weights(self.model, self.learners.policy_state())
            self.loaded = self.learners.changes
        return self.model


def _close(closers: list[Callable[[], Any]]) -> None:
    for close in closers:
        try:
            close()
        except Exception:  # one failing cleanup must not keep the others from running
            continue
