"""Ray actors: a rollout worker, a learner rank, a reward worker, an auxiliary-model server.

Each builds its part with the same core functions the local runtime calls (:mod:`align.build`): the rollout worker
the recipe's engine, a learner rank the core's learner with a DeepSpeed strategy, a reward worker the recipe's
rewards. The runtime (:mod:`ray_jobs.runtime`) puts proxies with the core's protocols in front of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.build import engine_name, engine_options, make_learner, policy_model
from align.config import Recipe
from align.trainers.engines import get_engine_factory
from align.trainers.learner import PairBatch, PolicyBatch, PolicyLearner, PreferenceLearner
from align.trainers.protocols import Rollout, SamplingParams, TokenSamples
from ray_jobs.learner_deepspeed import DeepSpeedStrategy, init_distributed
from ray_jobs.weight_sync import bytes_to_state, state_to_bytes


def _threads(recipe: Recipe) -> None:
    count = recipe.runtime.threads or 1
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)


def load_weights(model: Any, state: Mapping[str, Tensor]) -> None:
    """Full weights, or a LoRA adapter's (PEFT names) into a PEFT model."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, dict(state))
    else:
        model.load_state_dict(dict(state))


@ray.remote
class RolloutWorker:
    """The recipe's engine over its own copy of the policy (base + LoRA adapter where there is one): the
    transformers engine samples from it, vLLM loads it (adapters merged) after every sync."""

    def __init__(self, recipe: Recipe, base: str) -> None:
        _threads(recipe)
        self.recipe = recipe
        self.model, tokenizer = policy_model(base, recipe)
        self.model.eval()
        self.engine = get_engine_factory(engine_name(recipe))(self.model, tokenizer, base, engine_options(recipe))

    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], samples_per_prompt: int,
                 params: SamplingParams, seed: int) -> Rollout:
        start = time.perf_counter()
        rollout: Rollout = self.engine.generate(prompts, columns, samples_per_prompt=samples_per_prompt,
                                                params=params, seed=seed)
        rollout.timings["generate"] = time.perf_counter() - start  # the driver splits its wait into this + Ray
        return rollout

    def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
                        seed: int) -> TokenSamples:
        start = time.perf_counter()
        samples: TokenSamples = self.engine.generate_tokens(prompt_ids, params=params, seed=seed)
        samples.timings["generate"] = time.perf_counter() - start
        return samples

    def sync(self, payload: bytes, version: int) -> int:
        """Load the learner's weights (the adapter alone under LoRA) and tag later rollouts with ``version``."""
        load_weights(self.model, bytes_to_state(payload))
        self.engine.sync_weights(self.model, version)
        return version

    def open_sync(self, host: str, port: int, backend: str) -> None:
        from ray_jobs.weight_sync import BroadcastGroup

        self.group = BroadcastGroup(host=host, port=port, rank=1, world_size=2, backend=backend)

    def receive(self, specs: Sequence[Any], version: int) -> int:
        received, state = self.group.receive(specs)
        if received != version:
            raise RuntimeError(f"weight sync: expected version {version}, the learner sent {received}")
        load_weights(self.model, {k: v.to("cpu") for k, v in state.items()})
        self.engine.sync_weights(self.model, version)
        return version

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class LearnerRank:
    """One data-parallel rank: the core's learner (:func:`align.build.make_learner`) with a DeepSpeed strategy."""

    def __init__(self, recipe: Recipe, spec: AlgorithmSpec, base: str, rank: int, world_size: int,
                 master_port: int) -> None:
        _threads(recipe)
        backend = "nccl" if recipe.runtime.device.startswith("cuda") else "gloo"
        init_distributed(rank=rank, world_size=world_size, master_port=master_port, backend=backend,
                         local_rank=0 if backend == "nccl" else rank)  # an actor sees only its own GPU
        model, _ = policy_model(base, recipe)

        def strategy(m: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> DeepSpeedStrategy:
            return DeepSpeedStrategy(m, optimizer, scheduler, zero_stage=recipe.runtime.zero_stage,
                                     max_grad_norm=recipe.learner.max_grad_norm, rank=rank, world_size=world_size)

        # learner.share_prompt holds here too: whether a rank's rows can share their prompt depends on its rows, and
        # ZeRO-3 gathers weights collectively in every model call, so the ranks agree on each forward's path
        # through the strategy (DeepSpeedStrategy.agree_min) and all share or none does
        self.learner: PolicyLearner | PreferenceLearner = make_learner(recipe, spec, model, strategy)

    def step(self, batch: PolicyBatch | PairBatch) -> dict[str, float]:
        return self.learner.step(batch)  # type: ignore[arg-type]

    def evaluate(self, batch: PairBatch) -> dict[str, float]:
        assert isinstance(self.learner, PreferenceLearner)
        return self.learner.evaluate(batch)

    def forward(self, method: str, batch: Any) -> Tensor:
        """``logprobs``, ``ref_logprobs``, ``entropy`` or (with a critic) ``values`` of the policy learner on
        ``batch``."""
        assert isinstance(self.learner, PolicyLearner) and method in ("logprobs", "ref_logprobs", "entropy", "values")
        result: Tensor = getattr(self.learner, method)(batch)
        return result

    def policy_bytes(self) -> bytes:
        """The trained weights (the adapter alone under LoRA) as safetensors bytes (every rank calls it together
        under ZeRO-3, where gathering is collective)."""
        return state_to_bytes(self.learner.policy_state())

    def save(self, directory: str) -> None:
        self.learner.save(Path(directory))

    def load(self, directory: str) -> None:
        self.learner.load(Path(directory))

    def open_sync(self, host: str, port: int, backend: str) -> list[Any]:
        """Rank 0: open the stateless sync group with the rollout worker; returns the tensors' metadata."""
        from ray_jobs.weight_sync import BroadcastGroup, tensor_specs

        self.group = BroadcastGroup(host=host, port=port, rank=0, world_size=2, backend=backend)
        return tensor_specs(self.learner.policy_state())  # the policy's weights (never a critic's value head)

    def send(self, version: int) -> None:
        self.group.send(self.learner.policy_state(), version)

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class RewardWorker:
    """The recipe's rewards (its plugins loaded in this process); returns the composer's scores."""

    def __init__(self, recipe: Recipe) -> None:
        from rewards.plugins import load_entry_points, load_plugins
        from rewards.provider import composer

        load_plugins(recipe.plugins)
        load_entry_points()
        self.composer = composer(list(recipe.rewards))

    def score(self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
              columns: Mapping[str, Sequence[Any]], step: int) -> Any:
        from rewards import RewardBatch

        start = time.perf_counter()
        scores = self.composer.score(RewardBatch(prompts=prompts, completions=completions,
                                                 completion_ids=completion_ids, columns=columns, step=step))
        scores.metrics["time/reward_compute"] = time.perf_counter() - start
        return scores

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class AuxModelWorker:
    """Serves an auxiliary model's per-token log-probs (and logits) to credit modules, from its own process."""

    def __init__(self, model_dir: str, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM

        from rewards.credit import CausalLMScorer

        self.scorer = CausalLMScorer(AutoModelForCausalLM.from_pretrained(model_dir).eval())

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        result: Tensor = self.scorer.token_logprobs(input_ids, attention_mask)
        return result

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        result: Tensor = self.scorer.logits(input_ids, attention_mask)
        return result


class RemoteScorer:
    """The credit modules' model protocol, answered by an :class:`AuxModelWorker` actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        result: Tensor = ray.get(self.actor.token_logprobs.remote(input_ids, attention_mask))
        return result

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        result: Tensor = ray.get(self.actor.logits.remote(input_ids, attention_mask))
        return result
