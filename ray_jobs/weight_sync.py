"""Weight sync from the learner to the rollout engine, and the check that makes a silent failure loud.

Payloads are safetensors bytes of the full policy weights (on CPU; on GPU the same module broadcasts over NCCL from
learner rank 0, exercised where a GPU is lent). After each sync a fixed probe batch is sampled by the engine and
scored by the learner: if the largest per-token log-prob gap exceeds the tolerance, the engine is not sampling the
weights being trained (a stale or partial sync, the bug behind verl #3821 and OpenRLHF #1349) and the run stops
with an error naming both versions and the gap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from align.errors import AlignError
from align.trainers.protocols import Rollout, SamplingParams


class StaleWeightsError(AlignError, RuntimeError):
    """The rollout engine samples from weights other than the learner's."""


def state_to_bytes(state: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    # clones: tied weights (embeddings and lm_head) share storage, which safetensors refuses
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def bytes_to_state(payload: bytes) -> dict[str, Tensor]:
    return load_safetensors(payload)


@dataclass(frozen=True)
class ProbeResult:
    engine_version: int
    learner_version: int
    max_gap: float
    mean_gap: float


class ProbeCheck:
    """Samples ``prompts`` with the engine and compares its log-probs with the learner's on the same tokens."""

    def __init__(self, prompts: Sequence[str], *, tolerance: float = 1e-3, max_new_tokens: int = 8,
                 temperature: float = 1.0) -> None:
        self.prompts, self.tolerance = list(prompts), tolerance
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)

    def __call__(self, engine: Any, learner_logprobs: Callable[[Rollout], Tensor],
                 learner_version: int) -> ProbeResult:
        """Sample the probe prompts with ``engine`` (in-process) and check them against the learner."""
        rollout: Rollout = engine.generate(self.prompts, {}, samples_per_prompt=1, params=self.params)
        with torch.no_grad():
            learner = learner_logprobs(rollout)
        return self.check(rollout, learner, learner_version)

    def check(self, rollout: Rollout, learner: Tensor, learner_version: int) -> ProbeResult:
        """Compare a probe rollout's log-probs with the learner's log-probs (B, T) on the same tokens."""
        gap = (learner - rollout.logp).abs() * rollout.mask
        result = ProbeResult(engine_version=rollout.weight_version, learner_version=learner_version,
                             max_gap=float(gap.max()), mean_gap=float(gap.sum() / rollout.mask.sum().clamp(min=1)))
        if result.max_gap > self.tolerance or result.engine_version != learner_version:
            raise StaleWeightsError(
                f"rollout engine (weights v{result.engine_version}) disagrees with the learner (v{learner_version}): "
                f"max log-prob gap {result.max_gap:.3g} > tolerance {self.tolerance:g}; the engine is sampling "
                "stale weights, stopping before training on them")
        return result


# ---------------------------------------------------------------------------------------------------------------
# Collective sync protocol: the source broadcasts the version, then every tensor in a fixed order, to receivers
# that allocated buffers from the metadata (NCCL between GPUs; gloo here, where it is tested in two processes).
# NOT YET WIRED into the Ray runtime: learner rank 0 already belongs to DeepSpeed's process group, and a second,
# separate group with the rollout worker needs a stateless group (as vLLM's StatelessProcessGroup + PyNccl); the
# runtime syncs through the object store meanwhile.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def tensor_specs(state: dict[str, Tensor]) -> list[TensorSpec]:
    """The metadata the receiver needs to allocate buffers (sent once, e.g. through Ray)."""
    return [TensorSpec(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


class BroadcastGroup:
    """A two-party (or wider) process group between the learner's rank 0 (source, rank 0 here) and receivers."""

    def __init__(self, *, rank: int, world_size: int, init_method: str, backend: str = "gloo") -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("BroadcastGroup needs a process without a default process group (see the note above)")
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
        self.dist, self.group, self.rank = dist, None, rank

    def send(self, state: dict[str, Tensor], version: int) -> None:
        """Source side: the version first (receivers check it), then every tensor in ``tensor_specs`` order."""
        self.dist.broadcast(torch.tensor([version], dtype=torch.long), src=0, group=self.group)
        for tensor in state.values():
            self.dist.broadcast(tensor.detach().contiguous(), src=0, group=self.group)

    def receive(self, specs: Sequence[TensorSpec], device: str = "cpu") -> tuple[int, dict[str, Tensor]]:
        """Receiver side: (version, state) with freshly received tensors."""
        version = torch.zeros(1, dtype=torch.long)
        self.dist.broadcast(version, src=0, group=self.group)
        state = {}
        for spec in specs:
            buffer = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device=device)
            self.dist.broadcast(buffer, src=0, group=self.group)
            state[spec.name] = buffer
        return int(version.item()), state

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
