"""Reducers: turn an unreduced (B, T) token loss into the scalar of one optimiser step.

Every reducer divides by counts of the *whole optimiser step* (all micro-batches and data-parallel ranks), held in
a :class:`StepNormalizer` built once per step. Micro-batch losses therefore simply add up: splitting a step into
micro-batches or ranks never changes the loss or the gradient. (Per-micro-batch means, the usual default, weight
tokens differently depending on how the batch was cut.)

Zero-length rows (no trainable token) count in no per-sequence denominator and add 0 to numerators (project
decision, as verl). Definitions follow the spec, §0 "Aggregations"; ``seq_mean_token_sum_norm`` follows the
Dr. GRPO paper (arXiv 2503.20783, Listing 1): (1/|B|) sum_i sum_t l / L_norm, not verl's variant without 1/|B|.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from align.errors import InputError
from align.ops import masked_sum, sequence_lengths
from align.registry import Registry

Reducer = Callable[[Tensor, Tensor, "StepNormalizer"], Tensor]
REDUCERS: Registry[Reducer] = Registry("reducer")


@dataclass(frozen=True)
class StepNormalizer:
    """Counts over one whole optimiser step.

    num_tokens: sum_i L_i over the step.  num_sequences: N_B, rows with L_i > 0.
    length_norm: L_norm of ``seq_mean_token_sum_norm``: the generation budget if given, else the padded response
    length T of the step (the widest micro-batch).
    """

    num_tokens: float
    num_sequences: float
    length_norm: float

    @classmethod
    def from_masks(cls, masks: Tensor | Iterable[Tensor], *, generation_budget: int | None = None) -> StepNormalizer:
        """Build from the masks of every micro-batch of the step (one (B, T) tensor or an iterable of them).

        For data-parallel training build it from the local masks and call :meth:`all_reduce`.
        """
        parts = [masks] if isinstance(masks, Tensor) else list(masks)
        if not parts:
            raise InputError("StepNormalizer.from_masks needs at least one (B, T) mask")
        if generation_budget is not None and generation_budget <= 0:
            raise InputError(f"generation_budget must be a positive token count, got {generation_budget}")
        tokens = sum(float((m != 0).sum()) for m in parts)
        sequences = sum(float(((m != 0).sum(-1) > 0).sum()) for m in parts)
        padded = max(int(m.shape[-1]) for m in parts)
        return cls(tokens, sequences, float(generation_budget if generation_budget is not None else padded))

    @classmethod
    def combine(cls, parts: Iterable[StepNormalizer]) -> StepNormalizer:
        """Counts of several shards of one step (what :meth:`all_reduce` computes across ranks)."""
        parts = list(parts)
        if not parts:
            raise InputError("StepNormalizer.combine needs at least one part")
        return cls(sum(p.num_tokens for p in parts), sum(p.num_sequences for p in parts),
                   max(p.length_norm for p in parts))

    def all_reduce(self, group: object | None = None) -> StepNormalizer:
        """Sum the counts over data-parallel ranks (and take the max padded length) with ``torch.distributed``.

        Returns ``self`` unchanged when torch.distributed is not initialised (single process).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        counts = torch.tensor([self.num_tokens, self.num_sequences], dtype=torch.float64)
        length = torch.tensor([self.length_norm], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(length, op=dist.ReduceOp.MAX, group=group)
        return StepNormalizer(float(counts[0]), float(counts[1]), float(length[0]))


def _safe(count: float) -> float:
    # A step with nothing trainable yields a zero loss (still attached to the graph), never 0/0 = NaN.
    return count if count > 0 else 1.0


@REDUCERS.register("token_mean")
def token_mean(loss: Tensor, mask: Tensor, norm: StepNormalizer) -> Tensor:
    """sum_{i,t} l_{i,t} / sum_i L_i  (DAPO, arXiv 2503.14476 eq. 12; global token count). loss, mask: (B, T)."""
    return masked_sum(loss, mask) / _safe(norm.num_tokens)


@REDUCERS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss: Tensor, mask: Tensor, norm: StepNormalizer) -> Tensor:
    """(1/N_B) sum_i (1/L_i) sum_t l_{i,t}  (GRPO, arXiv 2402.03300 eq. 3). loss, mask: (B, T)."""
    lengths = sequence_lengths(mask).to(loss.dtype).clamp(min=1)  # (B,); zero-length rows add 0 below
    return (masked_sum(loss, mask, dim=-1) / lengths).sum() / _safe(norm.num_sequences)


@REDUCERS.register("seq_mean_token_sum")
def seq_mean_token_sum(loss: Tensor, mask: Tensor, norm: StepNormalizer) -> Tensor:
    """(1/N_B) sum_i sum_t l_{i,t}: a sequence-level sum, as REINFORCE/RLOO. loss, mask: (B, T)."""
    return masked_sum(loss, mask) / _safe(norm.num_sequences)


@REDUCERS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, norm: StepNormalizer) -> Tensor:
    """(1/N_B) sum_i sum_t l_{i,t} / L_norm  (Dr. GRPO, arXiv 2503.20783 Listing 1). loss, mask: (B, T)."""
    return masked_sum(loss, mask) / (_safe(norm.num_sequences) * norm.length_norm)
