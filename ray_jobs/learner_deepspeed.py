"""A DeepSpeed learner rank (ZeRO stage 2 or 3; gloo on CPU, NCCL on GPU) computing exactly the local runtime's loss.

Each rank takes whole groups of the step's batch. The step-wide normaliser is all-reduced first, so every rank's
loss is its share of the global loss; DeepSpeed averages gradients over ranks, so the share is multiplied by the
world size and the averaged gradient is the gradient of the whole step, as in the local runtime. Used in-process by
tests (two ranks in two processes) and inside Ray actors by :mod:`ray_jobs.group`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.losses import PolicyInputs, StepNormalizer
from align.objective import active_rows, policy_step_loss
from align.trainers.sequences import response_forward

SHARD_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "mask", "logp", "advantages", "group_ids")


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    zero_stage: int = 2
    temperature: float = 1.0
    backend: str = "gloo"  # "nccl" on GPUs
    seed: int = 0
    optimizer: str = "adamw"  # "sgd" makes a step equal to -lr * gradient (used to compare gradients exactly)


def deepspeed_config(config: LearnerConfig) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no JIT-compiled optimizer on CPU
        "steps_per_print": 10**9,
    }
    if config.max_grad_norm is not None:
        cfg["gradient_clipping"] = config.max_grad_norm
    return cfg


class DeepSpeedLearner:
    """One rank. ``model`` is a loaded causal LM (every rank loads the same weights)."""

    def __init__(self, model: Any, spec: AlgorithmSpec, config: LearnerConfig, *, rank: int, world_size: int,
                 master_addr: str = "127.0.0.1", master_port: int = 29500) -> None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/align/torch_extensions"))
        import deepspeed

        # The shared-memory comm op is JIT-compiled with g++ on first use (25-35 s); gloo serves on CPU.
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
        torch.manual_seed(config.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer = (
            torch.optim.SGD(params, lr=config.lr) if config.optimizer == "sgd"
            else torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay))
        deepspeed.init_distributed(dist_backend=config.backend, auto_mpi_discovery=False)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config))
        self.spec, self.config = spec, config
        self.rank, self.world_size = rank, world_size
        self.version = 0

    def step(self, shard: dict[str, Tensor], ref_logp: Tensor | None = None, *, off_policy: str | None = None,
             is_cap: float = 2.0) -> dict[str, float]:
        """One optimiser step over this rank's rows; returns the loss share and stats of this rank.

        ``off_policy`` ("token" or "sequence"): the rows were sampled by an older policy. The learner's own
        log-probs before the update become pi_old (the proximal policy of the PPO ratio) and the advantages are
        weighted by the truncated importance ratio min(pi_learner / pi_rollout, is_cap), per token or per
        sequence (the geometric mean over the row's tokens).
        """
        import torch.distributed as dist

        mask = shard["mask"]
        extra: dict[str, float] = {}
        if off_policy is not None:
            shard = dict(shard)
            proximal = self.logprobs(shard)  # (B, T) under the current weights, no gradient
            log_w = proximal - shard["logp"]
            if off_policy == "sequence":
                log_w = (log_w * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
                log_w = log_w.expand_as(mask)
            weight = log_w.exp()
            truncated = weight > is_cap
            shard["advantages"] = shard["advantages"] * weight.clamp(max=is_cap) * mask
            shard["logp"] = proximal
            tokens = mask.sum().clamp(min=1)
            extra = {"is/weight_mean": float((weight * mask).sum() / tokens),
                     "is/truncated_frac": float((truncated.float() * mask).sum() / tokens)}
        local = StepNormalizer.from_masks(mask)  # over all rows: skipped rows still count in the step's counts
        normalizer = local.all_reduce() if dist.is_initialized() else local
        # as in the local trainer, groups whose advantages are all exactly 0 are skipped when that is exact; a rank
        # left with none still runs one row at loss scale 0: DeepSpeed's gradient reduction needs every backward
        live = active_rows(self.spec, shard["advantages"], shard["mask"], shard["group_ids"])
        rows, scale = (live.nonzero().squeeze(-1), 1.0) if bool(live.any()) else (torch.arange(1), 0.0)
        part = {k: v[rows] for k, v in shard.items()}
        mask = part["mask"]
        self.engine.train()
        logp, entropy, _ = response_forward(self.engine, part["prompt_ids"], part["prompt_mask"],
                                            part["completion_ids"], mask, temperature=self.config.temperature,
                                            with_entropy=True)
        inputs = PolicyInputs(logp=logp, old_logp=part["logp"], advantages=part["advantages"], mask=mask,
                              token_ids=part["completion_ids"], group_ids=part["group_ids"], entropy=entropy)
        loss, stats = policy_step_loss(self.spec, inputs, normalizer,
                                       ref_logp=None if ref_logp is None else ref_logp[rows])
        # DeepSpeed averages over ranks, so the shares are multiplied by the world size to add up
        self.engine.backward(loss * (self.world_size * scale))
        self.engine.step()
        self.version += 1
        out = {**{k: float(v) for k, v in stats.items()}, **extra}
        out["logprob_gap/rollout_vs_learner"] = float(((logp.detach() - part["logp"]).abs() * mask).sum()
                                                      / mask.sum().clamp(min=1))
        out["update/skipped_rows_frac"] = 1.0 - (len(rows) * scale) / max(len(shard["mask"]), 1)
        out["update/active_tokens"] = float(mask.sum()) * scale  # the driver weights per-token stats by this
        if scale == 0.0:  # the stand-in row's stats describe nothing: report only what is exact
            out = {"loss": 0.0, "pg_loss": 0.0, **extra, "update/skipped_rows_frac": 1.0,
                   "update/active_tokens": 0.0}
        return out

    @torch.no_grad()
    def logprobs(self, shard: dict[str, Tensor]) -> Tensor:
        self.engine.eval()
        logp, _, _ = response_forward(self.engine.module, shard["prompt_ids"], shard["prompt_mask"],
                                      shard["completion_ids"], shard["mask"], temperature=self.config.temperature)
        return logp

    def full_state(self) -> dict[str, Tensor]:
        """The full weights on CPU. ZeRO-2 keeps whole parameters on every rank; ZeRO-3 partitions them, so they
        are gathered first (every rank must call this together under ZeRO-3)."""
        from contextlib import nullcontext

        import deepspeed

        gather = (deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
                  if self.config.zero_stage == 3 else nullcontext())
        with gather:
            return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.engine.module.state_dict().items()}

    def state_bytes(self) -> bytes:
        """The full weights as safetensors bytes."""
        return save_safetensors(self.full_state())

    def parameters_snapshot(self) -> dict[str, Tensor]:
        state = self.full_state()
        return {k: state[k] for k, _ in self.engine.module.named_parameters()}


def shard_rows(group_ids: Tensor, world_size: int) -> list[Tensor]:
    """Row indices per rank: whole groups, dealt round-robin (GTPO needs the group on one rank)."""
    groups = group_ids.unique_consecutive()
    return [torch.isin(group_ids, groups[r::world_size]).nonzero().squeeze(-1) for r in range(world_size)]


def take(batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {k: batch[k][rows] for k in SHARD_KEYS}


