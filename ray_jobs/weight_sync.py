"""Weight transports from the learner ranks to the rollout worker on Ray.

Two transports: safetensors bytes of the policy weights (or the LoRA adapter alone) through Ray's object store, or
a broadcast from learner rank 0 over a stateless process group (gloo on CPU; NCCL on GPUs, not yet run on one).
Whatever the transport, the controller verifies each sync with the core's probe (:mod:`align.trainers.probe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor


def state_to_bytes(state: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    # clones: tied weights (embeddings and lm_head) share storage, which safetensors refuses
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def bytes_to_state(payload: bytes) -> dict[str, Tensor]:
    return load_safetensors(payload)


# ---------------------------------------------------------------------------------------------------------------
# Collective sync: the source (learner rank 0) broadcasts the version, then every tensor in a fixed order, to
# receivers that allocated buffers from the metadata. The group is *stateless*: its own TCP store and process group
# object, independent of the default group DeepSpeed set up, so learner rank 0 can belong to both. gloo on CPU (tested
# here); NCCL between GPUs (the same calls on CUDA tensors; not yet exercised on a GPU).
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
    """A stateless process group between a source (rank 0) and receivers (ranks 1..)."""

    def __init__(self, *, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 300.0) -> None:
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        if backend == "nccl":
            self.pg: Any = dist.ProcessGroupNCCL(self.store, rank, world_size)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        self.dist, self.rank = dist, rank

    def _broadcast(self, tensor: Tensor) -> None:
        options = self.dist.BroadcastOptions()
        options.rootRank = 0
        self.pg.broadcast([tensor], options).wait()

    def send(self, state: dict[str, Tensor], version: int) -> None:
        """Source side: the version first (receivers check it), then every tensor in ``tensor_specs`` order."""
        self._broadcast(torch.tensor([version], dtype=torch.long, device=self.device))
        for tensor in state.values():
            self._broadcast(tensor.detach().to(self.device).contiguous())

    def receive(self, specs: Sequence[TensorSpec]) -> tuple[int, dict[str, Tensor]]:
        """Receiver side: (version, state) with freshly received tensors."""
        version = torch.zeros(1, dtype=torch.long, device=self.device)
        self._broadcast(version)
        state = {}
        for spec in specs:
            buffer = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device=self.device)
            self._broadcast(buffer)
            state[spec.name] = buffer
        return int(version.item()), state
