"""Reward workers behind the core's :class:`~align.trainers.protocols.RewardFunction` protocol."""

from __future__ import annotations

from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from align.config import Recipe
from align.trainers.protocols import RewardResult, Rollout
from ray_jobs.actors import RewardWorker
from ray_jobs.placement import Placement


class RewardPool:
    """:class:`~align.trainers.protocols.RewardFunction` over reward workers (consecutive shards of the batch, merged
    as if scored at once); a worker that dies is replaced and the batch rescored."""

    def __init__(self, recipe: Recipe, placement: Placement) -> None:
        self.recipe, self.placement, self.restarts = recipe, placement, 0
        self.workers = [self._new(i) for i in range(recipe.runtime.reward_workers)]

    def _new(self, slot: int) -> Any:
        self.restarts += 1
        name = f"align-reward-{self.placement.tag}-{self.restarts}"
        return RewardWorker.options(num_cpus=0.25, name=name,
                                    scheduling_strategy=self.placement.bundle(self.placement.reward(slot))) \
            .remote(self.recipe)

    def __call__(self, rollout: Rollout, step: int) -> RewardResult:
        from rewards.combine import merge_scores

        ids = rollout.token_lists()
        chunks = [c.tolist() for c in torch.arange(len(rollout)).chunk(len(self.workers))]
        for attempt in range(3):
            try:
                parts = ray.get([w.score.remote([rollout.prompts[i] for i in rows],
                                                [rollout.completions[i] for i in rows], [ids[i] for i in rows],
                                                {k: [v[i] for i in rows] for k, v in rollout.columns.items()}, step)
                                 for w, rows in zip(self.workers, chunks, strict=False)])
                # the workers run in parallel: the slowest one is the reward compute on the critical path
                compute = max((p.metrics.pop("time/reward_compute", 0.0) for p in parts), default=0.0)
                scores = merge_scores(parts)
                return RewardResult(rewards=scores.total, valid=scores.valid, per_reward=scores.per_reward,
                                    metrics={**scores.metrics, "time/reward_compute": compute},
                                    failures=scores.failures)
            except RayActorError:
                if attempt == 2:
                    raise
                self.workers = [w if _alive(w) else self._new(i) for i, w in enumerate(self.workers)]
        raise AssertionError("unreachable")

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)


def _alive(worker: Any) -> bool:
    try:
        ray.get(worker.pid.remote(), timeout=30)
        return True
    except Exception:  # any failure means: replace it
        return False
