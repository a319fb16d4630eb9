"""The DeepSpeed strategy of a learner rank (ZeRO stage 0-3; gloo on CPU, NCCL on GPU).

The step math is the core's (:class:`align.trainers.learner.PolicyLearner` / ``PreferenceLearner``); this file only
says how gradients are applied on one of several ranks. The batch carries the step-wide normaliser, so each rank's
loss is its exact share of the step's loss; DeepSpeed averages gradients over ranks, so the share is multiplied by
the world size and the averaged gradient is the gradient of the whole step, as in one process. Micro-batches
accumulate with DeepSpeed's manual accumulation boundary (one gradient reduction per optimiser step).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def deepspeed_config(*, zero_stage: int, max_grad_norm: float | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # the core's torch AdamW: no JIT-compiled optimizer on CPU
        "steps_per_print": 10**9,
    }
    if max_grad_norm is not None:
        cfg["gradient_clipping"] = max_grad_norm
    return cfg


def init_distributed(*, rank: int, world_size: int, master_port: int, backend: str,
                     master_addr: str = "127.0.0.1", local_rank: int | None = None) -> None:
    """Join the learners' process group (DeepSpeed's, with its CPU accelerator and gloo on CPU). ``local_rank``:
    the device index this process uses (0 in a Ray actor, which sees only its own GPU); default ``rank``."""
    local = rank if local_rank is None else local_rank
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local), MASTER_ADDR=master_addr,
                      MASTER_PORT=str(master_port))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/align/torch_extensions"))
    import deepspeed

    # The shared-memory comm op is JIT-compiled with g++ on first use (25-35 s); gloo serves on CPU.
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class DeepSpeedStrategy:
    """A :class:`~align.trainers.learner.Strategy` over a DeepSpeed engine. ``optimizer`` and ``scheduler`` are the
    core's (the same AdamW and schedule as in one process); the scheduler is stepped once per batch by the learner,
    not by DeepSpeed."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, *, zero_stage: int,
                 max_grad_norm: float | None, rank: int, world_size: int) -> None:
        import deepspeed

        self.engine, self.optimizer, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(zero_stage=zero_stage,
                                                                     max_grad_norm=max_grad_norm))
        self.model, self.module = self.engine.module, self.engine
        self.scheduler, self.zero_stage = scheduler, zero_stage
        self.rank, self.world_size = rank, world_size

    def backward(self, loss: Tensor, *, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss * self.world_size)  # DeepSpeed averages over ranks; the shares must add up

    def agree(self, count: int) -> int:
        import torch.distributed as dist

        # on the engine's device: NCCL reduces only CUDA tensors (gloo takes CPU ones)
        value = torch.tensor([count], dtype=torch.long, device=self.engine.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    def agree_min(self, values: Sequence[int]) -> list[int]:
        """The element-wise minimum of ``values`` (K,) over the ranks: one all-reduce on the default group (the
        engine's, whose ranks gather ZeRO-3 weights together), none for a single rank."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return list(values)
        value = torch.tensor(list(values), dtype=torch.long, device=self.engine.device)  # NCCL: CUDA; gloo: CPU
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return [int(v) for v in value.tolist()]

    def optimizer_step(self) -> float:
        # ZeRO stage 0 wraps the torch optimiser, which records no norm: take it from the all-reduced gradients
        manual = None
        if self.zero_stage == 0:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            manual = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
                if grads else 0.0
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if manual is None else manual
        return float(norm) if norm is not None else 0.0

    def scheduler_step(self) -> None:
        self.scheduler.step()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def full_state(self) -> dict[str, Tensor]:
        """The full weights on CPU. ZeRO-3 partitions them, so they are gathered first (every rank must call this
        together under ZeRO-3)."""
        from contextlib import nullcontext

        import deepspeed

        gather = (deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
                  if self.zero_stage == 3 else nullcontext())
        with gather:
            return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="zero")
        if self.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict()}, directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="zero")
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint under {directory}")
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False)["scheduler"])
