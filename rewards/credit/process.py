"""Process rewards: scores of reasoning steps placed at the tokens that end each step."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from align.errors import InputError
from rewards.credit.base import CreditInputs, register_credit


def step_end_positions(ids: Sequence[int], valid: Sequence[bool], is_end: Callable[[int], bool]) -> list[int]:
    """Positions of trainable tokens that end a step: each delimiter, and the last trainable token."""
    trainable = [t for t, ok in enumerate(valid) if ok]
    ends = [t for t in trainable if is_end(int(ids[t]))]
    if trainable and (not ends or ends[-1] != trainable[-1]):
        ends.append(trainable[-1])
    return ends


@register_credit("prm_steps", output="rewards", level="token_rewards", owns_scale=True)
def prm_steps(
    x: CreditInputs,
    *,
    delimiter_ids: Sequence[int] = (),
    is_delimiter: Callable[[int], bool] | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Step scores at step ends (DeepSeekMath process supervision, arXiv 2402.03300 §4.1.3).

    A step ends at a token whose id is in ``delimiter_ids`` (or for which ``is_delimiter(id)`` is true), and the
    final step at the row's last trainable token. Row i needs exactly one score per step in ``step_rewards[i]``.
    ``normalize=True`` applies GRPO-PRM's normalisation: (r - mean) / (std + eps) over all step scores of the
    group (Bessel std; a lone score gets mean 0, std 1). A reward-to-go estimator then gives each token the sum of
    the (normalised) scores of its step and all later steps, as the paper's A_{i,t} = sum_{index(j) >= t} r~_j.

    The module owns the scale of its rewards (registered ``owns_scale``): follow it with
    ``dense_group(scale_by_std=False)``, which is then exactly the paper's A_{i,t} (normalised scores sum to 0 over
    each group, so the group baseline is 0); ``AlgorithmSpec(credit="prm_steps", advantage="dense_group")`` refuses
    the default ``scale_by_std=True``, which would divide by the std of the group's returns a second time
    (step scores [[1, 1], [0]]: A at the first token 0.7071 instead of 1.1547). With ``normalize=False`` the raw
    PRM scale is kept (reward-to-go of raw scores minus the group mean).
    """
    x.require("prm_steps", "step_rewards")
    assert x.step_rewards is not None
    if len(x.step_rewards) != x.mask.shape[0]:
        raise InputError(f"step_rewards has {len(x.step_rewards)} rows for {x.mask.shape[0]} completions")
    delimiters = {int(d) for d in delimiter_ids}
    is_end = is_delimiter or (lambda token: token in delimiters)
    scores = [list(map(float, row)) for row in x.step_rewards]
    if normalize:
        scores = _group_normalise(scores, x.group_ids.tolist(), eps)
    out = torch.zeros(x.mask.shape, dtype=x.dtype)
    ids, valid = x.token_ids.tolist(), (x.mask != 0).tolist()
    for i in range(len(scores)):
        ends = step_end_positions(ids[i], valid[i], is_end)
        if len(ends) != len(scores[i]):
            raise InputError(f"row {i} has {len(ends)} steps (delimiters plus the final token) but "
                             f"{len(scores[i])} step scores; they must match")
        for position, score in zip(ends, scores[i], strict=True):
            out[i, position] += score
    return out


def _group_normalise(scores: list[list[float]], groups: list[int], eps: float) -> list[list[float]]:
    pooled: dict[int, list[float]] = {}
    for row, g in zip(scores, groups, strict=True):
        pooled.setdefault(g, []).extend(row)
    stats = {g: (statistics.mean(v), statistics.stdev(v)) if len(v) > 1 else (0.0, 1.0)
             for g, v in pooled.items() if v}
    # a group whose step scores are all equal carries no signal: its scores normalise to 0, never 0/0
    return [[(s - stats[g][0]) / (stats[g][1] + eps) if stats[g][1] + eps > 0 else 0.0 for s in row]
            for row, g in zip(scores, groups, strict=True)]
