"""Held-out evaluation: greedy completions scored by a verifier (1.0 = correct)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from align.trainers.protocols import SamplingParams
from align.trainers.rollout_hf import HFRolloutEngine

Verifier = Callable[[Sequence[str], Sequence[str], Mapping[str, Sequence[Any]]], list[float]]


def greedy_accuracy(model: Any, tokenizer: Any, prompts: Sequence[str], columns: dict[str, Sequence[Any]],
                    verifier: Verifier, *, max_new_tokens: int, batch_size: int = 512) -> float:
    """Share of prompts whose greedy completion the verifier scores >= 1 (exactly correct)."""
    engine = HFRolloutEngine(model, tokenizer, batch_size=batch_size)
    rollout = engine.generate(prompts, columns, samples_per_prompt=1,
                              params=SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    scores = verifier(rollout.prompts, rollout.completions, rollout.columns)
    return sum(s >= 1.0 - 1e-9 for s in scores) / max(1, len(scores))
