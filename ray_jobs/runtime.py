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

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from torch import Tensor

from align.build import policy_model
from align.components import Parts, RunPlan
from align.config import Recipe, RecipeError
from align.trainers.learner import PairBatch, PolicyBatch, merge_stats
from align.trainers.protocols import LearnerLost, RewardResult, Rollout, SamplingParams
from ray_jobs.actors import AuxModelWorker, LearnerRank, RemoteScorer, RewardWorker, RolloutWorker, load_weights
from ray_jobs.weight_sync import bytes_to_state


def _free_port() -> int:
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
    """The run's placement group and actor names (``align-<role>-<tag>``)."""

    def __init__(self, recipe: Recipe, *, policy: bool) -> None:
        from ray.util.placement_group import placement_group

        rt = recipe.runtime
        self.gpu = 1 if rt.device.startswith("cuda") else 0
        self.tag = f"{recipe.name}-{os.getpid()}-{time.time_ns() % 10**9}"
        self.learners = rt.learners
        engine = {"CPU": 0.5, **({"GPU": self.gpu} if self.gpu else {})}
        workers = rt.reward_workers if policy else 0
        bundles = [engine] + [dict(engine) for _ in range(rt.learners)] + [{"CPU": 0.25}] * workers
        self.group = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.group.ready(), timeout=120)
        except Exception:
            ray.util.remove_placement_group(self.group)
            gpus = ", one GPU each for rollout and learners" if self.gpu else ""
            raise RecipeError(f"recipe key 'runtime': the Ray cluster cannot place {len(bundles)} bundles "
                              f"({rt.learners} learner ranks, 1 rollout worker, {workers} reward workers{gpus}) "
                              "within 120 s") from None

    def bundle(self, index: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)

    def rollout(self) -> int:
        return 0

    def learner(self, rank: int) -> int:
        return 1 + rank

    def reward(self, slot: int) -> int:
        return 1 + self.learners + slot

    def close(self) -> None:
        ray.util.remove_placement_group(self.group)


# ---------------------------------------------------------------------------------------------------------------
# Proxies: the core's protocols over actors
# ---------------------------------------------------------------------------------------------------------------
class LearnerGroup:
    """:class:`~align.trainers.protocols.Learner` over DeepSpeed ranks: each rank takes its share of a batch (whole
    groups, or pairs), and the shares' statistics are merged by the core's :func:`merge_stats`."""

    def __init__(self, ranks: list[Any], zero_stage: int) -> None:
        self.ranks, self.zero_stage = ranks, zero_stage
        self.changes = 0  # counts what changes the weights (steps, loads): copies elsewhere compare against it

    def _all(self, calls: list[Any]) -> list[Any]:
        """Every rank's answer. Answers are taken as they arrive, so a dead rank is noticed at once, not after
        the live ranks give up waiting for it in a collective."""
        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done)
            except RayActorError as err:
                raise LearnerLost(f"a learner rank died ({type(err).__name__})") from None
        return ray.get(calls)

    def step(self, batch: PolicyBatch | PairBatch) -> dict[str, float]:
        shards = batch.shards(len(self.ranks))
        self.changes += 1
        return merge_stats(self._all([r.step.remote(s) for r, s in zip(self.ranks, shards, strict=True)]))

    def evaluate(self, batch: PairBatch) -> dict[str, float]:
        shards = batch.shards(len(self.ranks))
        return merge_stats(self._all([r.evaluate.remote(s) for r, s in zip(self.ranks, shards, strict=True)]))

    def _forward(self, method: str, batch: Any) -> Tensor:
        """(B, T) from every rank's share of the rows (every rank runs a forward: ZeRO-3 gathers collectively)."""
        tokens = TokenRows(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.mask)
        shares = torch.arange(len(tokens.mask)).tensor_split(len(self.ranks))
        parts = self._all([r.forward.remote(method, tokens.take(rows if len(rows) else torch.arange(1)))
                           for r, rows in zip(self.ranks, shares, strict=True)])
        return torch.cat([p[: len(rows)] for p, rows in zip(parts, shares, strict=True)])

    def logprobs(self, batch: Any) -> Tensor:
        return self._forward("logprobs", batch)

    def ref_logprobs(self, batch: Any) -> Tensor:
        return self._forward("ref_logprobs", batch)

    def entropy(self, batch: Any) -> Tensor:
        return self._forward("entropy", batch)

    def policy_bytes(self) -> bytes:
        """Rank 0's weights (under ZeRO-3 every rank takes part in the gather)."""
        ranks = self.ranks if self.zero_stage == 3 else self.ranks[:1]
        payload: bytes = self._all([r.policy_bytes.remote() for r in ranks])[0]
        return payload

    def policy_state(self) -> dict[str, Tensor]:
        return bytes_to_state(self.policy_bytes())

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._all([r.save.remote(str(directory)) for r in self.ranks])

    def load(self, directory: Path) -> None:
        self.changes += 1
        self._all([r.load.remote(str(directory)) for r in self.ranks])


@dataclass(frozen=True)
class TokenRows:
    """The token tensors of a batch (what a forward pass needs), as they travel to a rank."""

    prompt_ids: Tensor  # (B, P)
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, T)
    mask: Tensor  # (B, T)

    def take(self, rows: Tensor) -> TokenRows:
        return TokenRows(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows], self.mask[rows])


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
        port = _free_port()
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
        return _Submitted(self, self.worker.generate.remote(prompts, columns, samples_per_prompt, params, seed),
                          (prompts, columns, samples_per_prompt, params, seed))

    def close(self) -> None:
        ray.kill(self.worker, no_restart=True)


class _Submitted:
    def __init__(self, service: RolloutService, ref: Any, args: tuple[Any, ...]) -> None:
        self.service, self.ref, self.args = service, ref, args

    def result(self) -> Rollout:
        try:
            rollout: Rollout = ray.get(self.ref)
            return rollout
        except RayActorError:
            prompts, columns, n, params, seed = self.args
            return self.service.generate(prompts, columns, samples_per_prompt=n, params=params, seed=seed)


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
                                    metrics={**scores.metrics, "time/reward_compute": compute})
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


# ---------------------------------------------------------------------------------------------------------------
# The runtime
# ---------------------------------------------------------------------------------------------------------------
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
            port = _free_port()
            ranks = [LearnerRank.options(num_cpus=0.5, num_gpus=placement.gpu,
                                         scheduling_strategy=placement.bundle(placement.learner(rank)))
                     .remote(recipe, spec, str(plan.base), rank, recipe.runtime.learners, port)
                     for rank in range(recipe.runtime.learners)]
            actors.extend(ranks)
            learners = LearnerGroup(ranks, recipe.runtime.zero_stage)

            def load_scorer(path: str) -> Any:
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
