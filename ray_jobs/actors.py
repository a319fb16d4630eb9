"""Ray actors: a rollout worker (vLLM or transformers generate), a DeepSpeed learner rank, a reward worker.

Each wraps a piece the local runtime already has; the driver (:mod:`ray_jobs.launch`) composes them.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.trainers.protocols import Rollout, SamplingParams
from align.trainers.sequences import response_forward
from ray_jobs.learner_deepspeed import DeepSpeedLearner, LearnerConfig
from ray_jobs.weight_sync import bytes_to_state


def _threads(count: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)


def _with_adapter(model: Any, lora: Mapping[str, Any] | None, seed: int = 0) -> Any:
    """The model with a LoRA adapter (same seed everywhere: every copy starts from the same adapter)."""
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **dict(lora)))


@ray.remote
class RolloutWorker:
    def __init__(self, model_dir: str, engine: str, options: Mapping[str, Any], threads: int = 1,
                 lora: Mapping[str, Any] | None = None) -> None:
        _threads(threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.padding_side = "left"
        self.model: Any = None
        # under LoRA only the adapter travels; a CPU copy of base + adapter merges it for engines without adapters
        self.adapted: Any = None if lora is None else _with_adapter(
            AutoModelForCausalLM.from_pretrained(model_dir), lora).eval()
        if engine == "vllm":
            from ray_jobs.rollout_vllm import VLLMRolloutEngine

            self.engine: Any = VLLMRolloutEngine(model_dir, tokenizer, **dict(options))
        else:
            from align.trainers.rollout_hf import HFRolloutEngine

            self.model = self.adapted or AutoModelForCausalLM.from_pretrained(model_dir).eval()
            self.engine = HFRolloutEngine(self.model, tokenizer)

    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], samples_per_prompt: int,
                 params: SamplingParams, seed: int) -> Rollout:
        torch.manual_seed(seed)  # the driver owns the randomness, so a resumed run samples the same
        start = time.perf_counter()
        rollout: Rollout = self.engine.generate(prompts, columns, samples_per_prompt=samples_per_prompt,
                                                params=params)
        rollout.timings["generate"] = time.perf_counter() - start  # the driver splits its wait into this + Ray
        return rollout

    def sync(self, payload: bytes, version: int) -> int:
        return self._load(bytes_to_state(payload), version)

    def open_sync(self, host: str, port: int, backend: str) -> None:
        from ray_jobs.weight_sync import BroadcastGroup

        self.group = BroadcastGroup(host=host, port=port, rank=1, world_size=2, backend=backend)

    def receive(self, specs: Sequence[Any], version: int) -> int:
        received, state = self.group.receive(specs)
        if received != version:
            raise RuntimeError(f"weight sync: expected version {version}, the learner sent {received}")
        return self._load({k: v.to("cpu") for k, v in state.items()}, version)

    def sync_adapter(self, payload: bytes, version: int) -> int:
        """Load LoRA adapter weights only (the base weights never move)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.adapted, bytes_to_state(payload))
        if self.model is None:  # vLLM: merged weights of base + adapter, computed here
            self.engine.sync_weights(self.adapted, version)
        else:
            self.engine.sync_weights(self.model, version)
        return version

    def _load(self, state: dict[str, Tensor], version: int) -> int:
        if self.model is None:
            self.engine.load_state(state, version)
        else:
            self.model.load_state_dict(state)
            self.engine.sync_weights(self.model, version)
        return version

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class LearnerRank:
    def __init__(self, model_dir: str, spec: AlgorithmSpec, config: LearnerConfig, rank: int, world_size: int,
                 master_port: int, threads: int = 1, lora: Mapping[str, Any] | None = None) -> None:
        _threads(threads)
        from transformers import AutoModelForCausalLM

        model = _with_adapter(AutoModelForCausalLM.from_pretrained(model_dir), lora, config.seed)
        self.lora = lora is not None
        self.reference = None
        if spec.kl is not None and not self.lora:  # under LoRA the reference is the base: adapters disabled
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.learner = DeepSpeedLearner(model, spec, config, rank=rank, world_size=world_size,
                                        master_port=master_port)
        self.temperature = config.temperature

    def ref_logprobs(self, shard: dict[str, Tensor]) -> Tensor | None:
        if self.lora and self.learner.spec.kl is not None:
            module = self.learner.engine.module
            with torch.no_grad(), module.disable_adapter():
                logp, _, _ = response_forward(module, shard["prompt_ids"], shard["prompt_mask"],
                                              shard["completion_ids"], shard["mask"], temperature=self.temperature)
            return logp
        if self.reference is None:
            return None
        with torch.no_grad():
            logp, _, _ = response_forward(self.reference, shard["prompt_ids"], shard["prompt_mask"],
                                          shard["completion_ids"], shard["mask"], temperature=self.temperature)
        return logp

    def adapter_bytes(self) -> bytes:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save

        state = get_peft_model_state_dict(self.learner.engine.module)
        return save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})

    def step(self, shard: dict[str, Tensor], ref_logp: Tensor | None, off_policy: str | None = None,
             is_cap: float = 2.0) -> dict[str, float]:
        start = time.perf_counter()
        stats = self.learner.step(shard, ref_logp, off_policy=off_policy, is_cap=is_cap)
        stats["time/learner_compute"] = time.perf_counter() - start  # forward, backward, all-reduce, optimiser
        return stats

    def logprobs(self, shard: dict[str, Tensor]) -> Tensor:
        return self.learner.logprobs(shard)

    def state_bytes(self) -> bytes:
        return self.learner.state_bytes()

    def open_sync(self, host: str, port: int, backend: str) -> list[Any]:
        """Rank 0: open the stateless sync group with the rollout worker; returns the tensors' metadata."""
        from ray_jobs.weight_sync import BroadcastGroup, tensor_specs

        self.group = BroadcastGroup(host=host, port=port, rank=0, world_size=2, backend=backend)
        return tensor_specs(self.learner.full_state())

    def send(self, version: int) -> None:
        self.group.send(self.learner.full_state(), version)

    def save(self, directory: str, tag: str) -> None:
        self.learner.engine.save_checkpoint(directory, tag=tag)

    def load(self, directory: str, tag: str) -> None:
        self.learner.engine.load_checkpoint(directory, tag=tag)


@ray.remote
class RewardWorker:
    def __init__(self, plugins: Sequence[str], terms: Sequence[Mapping[str, Any]], timeout: float = 30.0) -> None:
        import rewards

        rewards.load_plugins(plugins)
        rewards.load_entry_points()
        self.composer = rewards.RewardComposer([rewards.RewardTerm(**dict(t)) for t in terms], timeout=timeout)

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
        _threads(threads)
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
