"""Length shaping: DAPO's overlong penalty and a length budget that tightens over training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from annotated_types import Ge, Gt

from rewards.registry import reward

Tokens = Annotated[int, Gt(0)]  # a token count; checked by align validate (rewards.registry)


@reward("dapo_overlong")
def dapo_overlong(completion_ids: Sequence[int], *, max_length: Tokens = 20480, cache_length: Tokens = 4096) -> float:
    """DAPO overlong reward shaping (arXiv 2503.14476 eq. 13), added to the correctness reward.

    0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache inside the soft buffer; -1 beyond L_max.
    Defaults are the paper's (L_max = 20480, L_cache = 4096).
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    length = len(completion_ids)
    soft = max_length - cache_length
    if length <= soft:
        return 0.0
    if length <= max_length:
        return (soft - length) / cache_length
    return -1.0


def budget_at(step: int, start: int, end: int, ramp_steps: int) -> float:
    """Linear schedule from ``start`` tokens at step 0 to ``end`` tokens at ``ramp_steps`` and after."""
    frac = min(1.0, max(0, step) / ramp_steps) if ramp_steps > 0 else 1.0
    return start + (end - start) * frac


@reward("length_budget")
def length_budget(
    completion_ids: Sequence[int],
    step: int,
    *,
    start_budget: Tokens = 1024,
    end_budget: Tokens = 256,
    ramp_steps: Annotated[int, Ge(0)] = 1000,
    penalty: float = 1.0,
) -> float:
    """A curriculum of length budgets (this project's definition): the budget B(step) moves linearly from
    ``start_budget`` to ``end_budget`` over ``ramp_steps`` optimiser steps; a completion within budget gets 0,
    a longer one -penalty * min(1, (|y| - B) / B), so going twice over the budget costs the full penalty."""
    if start_budget <= 0 or end_budget <= 0:
        raise ValueError(f"budgets must be positive token counts, got {start_budget}, {end_budget}")
    budget = budget_at(step, start_budget, end_budget, ramp_steps)
    over = len(completion_ids) - budget
    return 0.0 if over <= 0 else -penalty * min(1.0, over / budget)
