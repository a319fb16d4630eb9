"""Where a run's actors go: one placement group per run (bundle 0 the rollout worker, then the learner ranks, then
the reward workers; GPU bundles where GPUs exist), and the connection to the cluster (``RAY_ADDRESS``, or an
embedded local Ray)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import ray

from align.config import Recipe, RecipeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(recipe: Recipe) -> None:
    if ray.is_initialized():
        return
    address = recipe.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ.get("ALIGN_RAY_TMP", "/tmp/ray-align"))


class Placement:
    """The run's placement group and actor names (``align-<role>-<tag>``). A policy run places a rollout worker
    (bundle 0), the learner ranks, then the reward workers; a preference run only the learner ranks."""

    def __init__(self, recipe: Recipe, *, policy: bool) -> None:
        from ray.util.placement_group import placement_group

        rt = recipe.runtime
        self.gpu = 1 if rt.device.startswith("cuda") else 0
        self.tag = f"{recipe.name}-{os.getpid()}-{time.time_ns() % 10**9}"
        self.learners, self.first_learner = rt.learners, 1 if policy else 0
        engine = {"CPU": 0.5, **({"GPU": self.gpu} if self.gpu else {})}
        workers = rt.reward_workers if policy else 0
        bundles = [engine] * self.first_learner + [dict(engine) for _ in range(rt.learners)] + \
            [{"CPU": 0.25}] * workers
        self.group = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.group.ready(), timeout=120)
        except Exception:
            ray.util.remove_placement_group(self.group)
            gpus = ", one GPU each for rollout and learners" if self.gpu else ""
            raise RecipeError(f"recipe key 'runtime': the Ray cluster cannot place {len(bundles)} bundles "
                              f"({rt.learners} learner ranks, {self.first_learner} rollout worker, {workers} reward "
                              f"workers{gpus}) within 120 s") from None

    def bundle(self, index: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)

    def rollout(self) -> int:
        assert self.first_learner == 1, "a preference run places no rollout worker"
        return 0

    def learner(self, rank: int) -> int:
        return self.first_learner + rank

    def reward(self, slot: int) -> int:
        return self.first_learner + self.learners + slot

    def close(self) -> None:
        ray.util.remove_placement_group(self.group)
