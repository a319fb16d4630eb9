"""Adapters that let a causal language model (transformers, or any module returning ``.logits``) serve as an
auxiliary credit model (:class:`~rewards.credit.base.TokenLogProbModel` and :class:`~rewards.credit.base.LogitsModel`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from align.ops import selective_log_softmax


class CausalLMScorer:
    """Wraps ``model(input_ids=..., attention_mask=...).logits`` (B, S, V); frozen, evaluated without gradient."""

    def __init__(self, model: Any, *, temperature: float = 1.0, chunk_rows: int | None = None) -> None:
        self.model, self.temperature, self.chunk_rows = model, temperature, chunk_rows

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, S) -> (B, S, V) next-token logits divided by the temperature."""
        out: Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=_positions(attention_mask)).logits
        return out / self.temperature

    @torch.no_grad()
    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, S) -> (B, S): [:, s] = log p(input_ids[:, s] | input_ids[:, :s]); [:, 0] = 0."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=_positions(attention_mask)).logits  # (B, S, V)
        logp = selective_log_softmax(logits[:, :-1], input_ids[:, 1:], temperature=self.temperature,
                                     chunk_rows=self.chunk_rows)
        return torch.cat([torch.zeros_like(logp[:, :1]), logp], 1)


def _positions(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as generate() uses (matters for absolute position embeddings)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
