"""The rollout worker behind the core's engine and weight-sync protocols, with replacement of a dead worker."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from align.config import Recipe
from align.trainers.protocols import Rollout, SamplingParams, TokenSamples
from ray_jobs.actors import RolloutWorker
from ray_jobs.group import LearnerGroup
from ray_jobs.placement import Placement, free_port


class RolloutService:
    """:class:`~align.trainers.protocols.AsyncRolloutEngine` and :class:`~align.trainers.protocols.WeightSync` over
    the rollout worker; a worker that dies is replaced, resynced to the current weights, and the call retried."""

    shares_module = False  # the worker holds its own copy of the weights: every sync is verified

    def __init__(self, recipe: Recipe, base: Path, placement: Placement, learners: LearnerGroup) -> None:
        self.recipe, self.base, self.placement, self.learners = recipe, str(base), placement, learners
        self.version, self.restarts = 0, 0
        self.lora = recipe.lora.enabled
        self.broadcast_specs: list[Any] | None = None
        self.worker = self._new_worker()

    def _new_worker(self) -> Any:
        name = f"align-rollout-{self.placement.tag}-{self.restarts}"
        worker = RolloutWorker.options(num_cpus=0.5, num_gpus=self.placement.gpu, name=name,
                                       scheduling_strategy=self.placement.bundle(self.placement.rollout())) \
            .remote(self.recipe, self.base)
        if self.recipe.runtime.weight_sync == "broadcast":
            self._open_broadcast(worker)
        return worker

    def _open_broadcast(self, worker: Any) -> None:
        """A stateless broadcast group between learner rank 0 and the rollout worker."""
        backend = "nccl" if self.recipe.runtime.device.startswith("cuda") else "gloo"
        host = ray.util.get_node_ip_address() if self.recipe.runtime.address else "127.0.0.1"
        port = free_port()
        self.broadcast_specs, _ = ray.get([self.learners.ranks[0].open_sync.remote(host, port, backend),
                                           worker.open_sync.remote(host, port, backend)])

    def _replace(self) -> None:
        """A fresh worker starts from the base weights: resync it to the current version."""
        self.restarts += 1
        self.worker = self._new_worker()
        self._push(self.worker, self.version)

    def _call(self, call: Callable[[Any], Any], retries: int = 2) -> Any:
        for attempt in range(retries + 1):
            try:
                return ray.get(call(self.worker))
            except RayActorError:
                if attempt == retries:
                    raise
                self._replace()
        raise AssertionError("unreachable")

    def _push(self, worker: Any, version: int) -> None:
        if self.broadcast_specs is not None:  # no bytes through the object store
            # the worker runs calls in order: let the generations queued ahead of this sync (runtime.max_staleness)
            # finish first, so rank 0's send never waits on them inside the group's timeout
            ray.get(worker.pid.remote())
            ray.get([self.learners.ranks[0].send.remote(version),
                     worker.receive.remote(self.broadcast_specs, version)])
        else:
            ray.get(worker.sync.remote(self.learners.policy_bytes(), version))

    # WeightSync
    def push(self, version: int) -> None:
        self.version = version
        for attempt in range(3):
            try:
                self._push(self.worker, version)
                return
            except RayActorError:
                if attempt == 2:
                    raise
                self._replace()

    # RolloutEngine
    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams, seed: int | None = None) -> Rollout:
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if seed is None else seed
        rollout: Rollout = self._call(lambda w: w.generate.remote(prompts, columns, samples_per_prompt, params,
                                                                  seed))
        return rollout

    def submit(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
               params: SamplingParams, seed: int) -> Any:
        return _Submitted(self.worker.generate.remote(prompts, columns, samples_per_prompt, params, seed),
                          lambda: self.generate(prompts, columns, samples_per_prompt=samples_per_prompt,
                                                params=params, seed=seed))

    # TokenEngine: token in, token out (multi-turn and partial rollouts)
    def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], *, params: SamplingParams,
                        seed: int | None = None) -> TokenSamples:
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if seed is None else seed
        samples: TokenSamples = self._call(lambda w: w.generate_tokens.remote(prompt_ids, params, seed))
        return samples

    def submit_tokens(self, prompt_ids: Sequence[Sequence[int]], *, params: SamplingParams, seed: int) -> Any:
        """:meth:`generate_tokens` without waiting: the worker samples while the driver goes on (a weight sync
        pushed meanwhile runs after it, in call order); ``.result()`` waits."""
        return _Submitted(self.worker.generate_tokens.remote(prompt_ids, params, seed),
                          lambda: self.generate_tokens(prompt_ids, params=params, seed=seed))

    def close(self) -> None:
        ray.kill(self.worker, no_restart=True)


class _Submitted:
    """A call running on the rollout worker; ``result()`` waits for it. If the worker died meanwhile, ``retry`` runs
    the same call again through the service (its replacement, resynced to the current weights)."""

    def __init__(self, ref: Any, retry: Callable[[], Any]) -> None:
        self.ref, self.retry = ref, retry

    def result(self) -> Any:
        try:
            return ray.get(self.ref)
        except RayActorError:
            return self.retry()
