"""Reducers on hand-computed values (zero-length rows excluded from N_B), and GTPO conflict weights == a loop."""

from __future__ import annotations

import random

import pytest
import torch

from align.losses import REDUCERS, StepNormalizer
from align.losses.conflict import conflict_weights

from ..conftest import mask_from_lengths

# loss rows: [1, 2, 3] (L=3), [] (L=0), [4, 6] (L=2); padded T = 4
LOSS = torch.tensor([[1.0, 2.0, 3.0, 50.0], [7.0, 7.0, 7.0, 7.0], [4.0, 6.0, 9.0, 9.0]], dtype=torch.float64)
MASK = mask_from_lengths([3, 0, 2], 4)


@pytest.mark.parametrize(
    ("name", "budget", "expected"),
    [
        ("token_mean", None, 16.0 / 5),
        ("seq_mean_token_mean", None, (2.0 + 5.0) / 2),  # N_B = 2: the empty row does not count
        ("seq_mean_token_sum", None, 16.0 / 2),
        ("seq_mean_token_sum_norm", None, 16.0 / (2 * 4)),  # L_norm = padded T = 4
        ("seq_mean_token_sum_norm", 10, 16.0 / (2 * 10)),  # L_norm = the generation budget
    ],
)
def test_reducer_hand_values(name: str, budget: int | None, expected: float) -> None:
    norm = StepNormalizer.from_masks(MASK, generation_budget=budget)
    assert (norm.num_tokens, norm.num_sequences) == (5.0, 2.0)
    assert REDUCERS.get(name)(LOSS, MASK, norm).item() == pytest.approx(expected, abs=1e-12)


def test_padded_length_of_a_step_is_its_widest_micro_batch() -> None:
    norm = StepNormalizer.from_masks([torch.ones(2, 3), torch.ones(1, 7), torch.zeros(4, 5)])
    assert norm == StepNormalizer(num_tokens=13.0, num_sequences=3.0, length_norm=7.0)


def loop_conflict_weights(rows: list[list[int]], signs: list[int], groups: list[int], mode: str, w: float = 2.0):
    """The spec's definition, one token at a time."""

    def shared(i: int, key, value) -> bool:
        members = [j for j in range(len(rows)) if groups[j] == groups[i]]
        pos = any(signs[j] > 0 and key(j) == value for j in members)
        neg = any(signs[j] < 0 and key(j) == value for j in members)
        return pos and neg

    out = []
    for i, row in enumerate(rows):
        factor = w if signs[i] > 0 else 0.0
        fwd = [shared(i, lambda j, t=t: rows[j][t] if t < len(rows[j]) else None, tok) for t, tok in enumerate(row)]
        if mode == "any_position":
            out.append([factor if c and signs[i] != 0 else 1.0 for c in fwd])
            continue
        weights = [1.0] * len(row)
        for t in range(len(row)):  # contiguous run from the start
            if not fwd[t] or signs[i] == 0:
                break
            weights[t] *= factor
        for s in range(len(row)):  # contiguous run from the end, rows aligned at their last token
            tok = row[len(row) - 1 - s]
            if signs[i] == 0 or not shared(i, lambda j, s=s: rows[j][len(rows[j]) - 1 - s] if s < len(rows[j])
                                           else None, tok):
                break
            weights[len(row) - 1 - s] *= factor
        out.append(weights)
    return out


@pytest.mark.parametrize("mode", ["prefix_suffix", "any_position"])
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_conflict_weights_equal_the_loop(mode: str, seed: int) -> None:
    rng = random.Random(seed)
    groups = [g for g in range(3) for _ in range(4)]
    rows = [[rng.randrange(3) for _ in range(rng.randint(1, 6))] for _ in groups]
    signs = [rng.choice([-1, 0, 1]) for _ in groups]
    mask = mask_from_lengths([len(r) for r in rows], 6)
    ids = torch.full(mask.shape, 99, dtype=torch.long)  # padding ids must never match
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    weights, n_conf = conflict_weights(ids, mask, torch.tensor(groups), torch.tensor(signs), mode=mode)
    expected = loop_conflict_weights(rows, signs, groups, mode)
    for i, row in enumerate(expected):
        assert weights[i, : len(row)].tolist() == row, (i, rows, signs)
        assert weights[i, len(row) :].abs().sum() == 0
        if signs[i] > 0:
            assert n_conf[i] == sum(1 for v in row if v != 1.0)
