"""Repetition and degenerate-loop penalty on completion token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from annotated_types import Ge

from rewards.registry import reward


def repeated_ngram_fraction(ids: Sequence[int], n: int) -> float:
    """Share of the completion's n-grams that already occurred earlier in it (0 for fewer than n+1 tokens)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def ends_in_loop(ids: Sequence[int], min_repeats: int, max_period: int) -> bool:
    """True if the completion ends with some block of <= max_period tokens repeated >= min_repeats times."""
    for period in range(1, max_period + 1):
        span = period * min_repeats
        if span > len(ids):
            break
        tail = list(ids[-span:])
        block = tail[-period:]
        if tail == block * min_repeats:
            return True
    return False


@reward("repetition_penalty")
def repetition_penalty(
    completion_ids: Sequence[int], *, ngram: Annotated[int, Ge(1)] = 3, loop_min_repeats: Annotated[int, Ge(2)] = 4,
    loop_max_period: Annotated[int, Ge(1)] = 20,
) -> float:
    """-1 if the completion ends in a degenerate loop, else minus the fraction of repeated ``ngram``-grams."""
    if ngram < 1 or loop_min_repeats < 2 or loop_max_period < 1:
        raise ValueError("need ngram >= 1, loop_min_repeats >= 2, loop_max_period >= 1")
    if ends_in_loop(completion_ids, loop_min_repeats, loop_max_period):
        return -1.0
    return -repeated_ngram_fraction(completion_ids, ngram)
