"""Advantage estimators: vectorised == a plain Python loop, hand-computed values, and edge cases."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from align import functional as F
from align.advantages import ADVANTAGES, nonuniform_groups
from align.errors import InputError

from ..conftest import loop_returns, mask_from_lengths, random_batch


def rows_by_group(group_ids: torch.Tensor) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    return groups


def loop_group_scalar(rewards, mask, group_ids, rule) -> torch.Tensor:
    """Apply ``rule(r_i, group_rewards)`` per row in Python and broadcast it over the row's trainable tokens."""
    out = torch.zeros_like(mask)
    groups = rows_by_group(group_ids)
    for i in range(mask.shape[0]):
        members = [float(rewards[j]) for j in groups[int(group_ids[i])]]
        value = rule(float(rewards[i]), members)
        for t in range(mask.shape[1]):
            if mask[i, t]:
                out[i, t] = value
    return out


def grpo_rule(r: float, group: list[float], eps: float = 1e-6) -> float:
    if len(group) == 1:
        return r / (1 + eps)
    return (r - statistics.mean(group)) / (statistics.stdev(group) + eps)


def loop_whiten(values: torch.Tensor, mask: torch.Tensor, ddof: int, eps: float) -> torch.Tensor:
    picked = [float(values[i, t]) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / (len(picked) - ddof)
    return torch.where(mask != 0, (values - mean) / math.sqrt(var + eps), torch.zeros_like(values))


def terminal(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[i, t]]
        if valid:
            out[i, valid[-1]] = rewards[i]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_estimators_match_loops(seed: int) -> None:
    b = random_batch(seed)
    b["rewards"] = b["rewards"] + 0.1 * torch.arange(len(b["rewards"]), dtype=torch.float64)
    mask, r, g = b["mask"], b["rewards"], b["group_ids"]
    kw = {"rewards": r, "mask": mask, "group_ids": g}
    torch.testing.assert_close(F.advantages("grpo", **kw), loop_group_scalar(r, mask, g, grpo_rule), rtol=0, atol=1e-9)
    centred = loop_group_scalar(r, mask, g, lambda x, grp: x - statistics.mean(grp))
    torch.testing.assert_close(F.advantages("dr_grpo", **kw), centred, rtol=0, atol=1e-9)
    torch.testing.assert_close(F.advantages("rloo", **kw), loop_group_scalar(
        r, mask, g, lambda x, grp: x - (sum(grp) - x) / (len(grp) - 1)), rtol=0, atol=1e-9)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_reinforce_pp_matches_loop(gamma: float) -> None:
    b = random_batch(4)
    mask, r, g = b["mask"], b["rewards"], b["group_ids"]
    expected = loop_whiten(loop_returns(terminal(r, mask), mask, gamma), mask, ddof=1, eps=1e-8)
    torch.testing.assert_close(F.advantages("reinforce_pp", rewards=r, mask=mask, group_ids=g, gamma=gamma),
                               expected, rtol=0, atol=1e-9)


def test_reinforce_pp_baseline_matches_loop() -> None:
    b = random_batch(5)
    mask, r, g = b["mask"], b["rewards"], b["group_ids"]
    centred = torch.tensor([float(r[i]) - statistics.mean(float(r[j]) for j in rows_by_group(g)[int(g[i])])
                            for i in range(len(r))], dtype=torch.float64)
    expected = loop_whiten(loop_returns(terminal(centred, mask), mask, 1.0), mask, ddof=1, eps=1e-8)
    torch.testing.assert_close(F.advantages("reinforce_pp_baseline", rewards=r, mask=mask, group_ids=g),
                               expected, rtol=0, atol=1e-9)


def test_token_rewards_feed_sequence_estimators_as_their_sum() -> None:
    b = random_batch(6)
    mask, g = b["mask"], b["group_ids"]
    token_r = torch.randn(mask.shape, dtype=torch.float64) * mask
    summed = token_r.sum(-1)
    torch.testing.assert_close(F.advantages("grpo", rewards=token_r, mask=mask, group_ids=g),
                               F.advantages("grpo", rewards=summed, mask=mask, group_ids=g), rtol=0, atol=1e-12)


def test_gae_hand_computed() -> None:
    # one row, 3 tokens, reward 1 at the end; V = [0.5, 0.2, 0.4]; gamma = 0.9, lam = 0.8
    mask = torch.ones(1, 3, dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 0.4]], dtype=torch.float64)
    d2 = 1.0 - 0.4
    d1 = 0.9 * 0.4 - 0.2
    d0 = 0.9 * 0.2 - 0.5
    expected = [d0 + 0.72 * d1 + 0.72**2 * d2, d1 + 0.72 * d2, d2]
    adv = F.advantages("gae", rewards=torch.tensor([1.0], dtype=torch.float64), mask=mask,
                       group_ids=torch.zeros(1, dtype=torch.long), values=values, gamma=0.9, lam=0.8, whiten=False)
    torch.testing.assert_close(adv[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)


def test_gae_skips_holes_and_needs_values() -> None:
    mask = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 123.0, 0.4]], dtype=torch.float64)
    adv = F.advantages("gae", rewards=torch.tensor([1.0], dtype=torch.float64), mask=mask,
                       group_ids=torch.zeros(1, dtype=torch.long), values=values, gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, 0.0, 0.6], dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="needs critic values"):
        F.advantages("gae", rewards=torch.tensor([1.0]), mask=mask, group_ids=torch.zeros(1, dtype=torch.long))


def test_dense_group_equals_grpo_for_terminal_rewards() -> None:
    b = random_batch(7)
    mask, r, g = b["mask"], b["rewards"], b["group_ids"]
    torch.testing.assert_close(F.advantages("dense_group", rewards=r, mask=mask, group_ids=g),
                               F.advantages("grpo", rewards=r, mask=mask, group_ids=g), rtol=0, atol=1e-12)


def test_dense_group_hand_computed() -> None:
    # group of two rows; row 0 rewards [0, -1, 2] (G = [1, 1, 2]); row 1 rewards [0, 0] + terminal 0 (G = [0, 0])
    mask = mask_from_lengths([3, 2], 3)
    rewards = torch.tensor([[0.0, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    groups = torch.zeros(2, dtype=torch.long)
    mu, sigma = 0.5, math.sqrt(0.5)  # totals [1, 0]: Bessel std sqrt(0.5)
    adv = F.advantages("dense_group", rewards=rewards, mask=mask, group_ids=groups, eps=0.0)
    expected = torch.tensor([[(1 - mu) / sigma, (1 - mu) / sigma, (2 - mu) / sigma],
                             [(0 - mu) / sigma, (0 - mu) / sigma, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    centred = F.advantages("dense_group", rewards=rewards, mask=mask, group_ids=groups, scale_by_std=False)
    torch.testing.assert_close(centred, torch.tensor([[0.5, 0.5, 1.5], [-0.5, -0.5, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)


# --- edge cases ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "dense_group"])
def test_all_equal_rewards_give_zero_not_nan(name: str) -> None:
    mask = mask_from_lengths([2, 3, 1])
    adv = F.advantages(name, rewards=torch.ones(3), mask=mask, group_ids=torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(adv).all()
    assert adv.abs().max() == 0


def test_group_of_one_uses_verl_rule_and_rloo_refuses() -> None:
    mask = mask_from_lengths([2, 3])
    groups = torch.tensor([0, 1])
    rewards = torch.tensor([0.7, -0.2], dtype=torch.float64)
    adv = F.advantages("grpo", rewards=rewards, mask=mask, group_ids=groups, eps=0.0)
    assert adv[:, 0].tolist() == pytest.approx([0.7, -0.2], abs=1e-12)
    with pytest.raises(InputError, match="rloo needs at least 2 samples"):
        F.advantages("rloo", rewards=rewards, mask=mask, group_ids=groups)


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_zero_length_rows_get_zero_and_stay_finite(name: str) -> None:
    mask = mask_from_lengths([2, 0, 3, 1])
    kw = {"values": torch.rand(4, 3, dtype=torch.float64)} if name == "gae" else {}
    adv = F.advantages(name, rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), mask=mask,
                       group_ids=torch.zeros(4, dtype=torch.long), **kw)
    assert torch.isfinite(adv).all()
    assert adv[1].abs().sum() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards_raise(bad: float) -> None:
    with pytest.raises(InputError, match="non-finite"):
        F.advantages("grpo", rewards=torch.tensor([1.0, bad]), mask=torch.ones(2, 2),
                     group_ids=torch.zeros(2, dtype=torch.long))


def test_shape_errors_are_one_line() -> None:
    with pytest.raises(InputError, match=r"rewards must be \(B,\)") as err:
        F.advantages("grpo", rewards=torch.ones(3), mask=torch.ones(2, 2), group_ids=torch.zeros(2, dtype=torch.long))
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="integer tensor"):
        F.advantages("grpo", rewards=torch.ones(2), mask=torch.ones(2, 2), group_ids=torch.zeros(2))


def test_grpo_is_invariant_to_positive_affine_reward_transforms() -> None:
    b = random_batch(8)
    mask, r, g = b["mask"], b["rewards"] + 0.3 * torch.arange(12, dtype=torch.float64), b["group_ids"]
    base = F.advantages("grpo", rewards=r, mask=mask, group_ids=g, eps=0.0)
    moved = F.advantages("grpo", rewards=3.0 * r - 7.0, mask=mask, group_ids=g, eps=0.0)
    torch.testing.assert_close(base, moved, rtol=0, atol=1e-9)


def test_nonuniform_groups_marks_dapo_filter() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    keep = nonuniform_groups(rewards, torch.ones(7, 2), groups)
    assert keep.tolist() == [False, False, True, True, False, False, False]


@pytest.mark.parametrize("value", [0.1, 0.7, 1 / 3])
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "dense_group", "reinforce_pp_baseline"])
def test_equal_non_dyadic_rewards_give_exactly_zero(name: str, value: float) -> None:
    """8 equal rewards of 0.7 do not average back to 0.7 in floating point; the advantage must still be 0."""
    for dtype in (torch.float32, torch.float64):
        rewards = torch.full((8,), value, dtype=dtype)
        adv = F.advantages(name, rewards=rewards, mask=torch.ones(8, 3), group_ids=torch.zeros(8, dtype=torch.long))
        if name == "reinforce_pp_baseline":
            assert adv.abs().max() < 1e-3  # whitening of an all-zero batch: 0 / sqrt(eps)
        else:
            assert adv.abs().max() == 0, (name, dtype)
    keep = nonuniform_groups(torch.tensor([value] * 4 + [value, 0.2]), torch.ones(6, 2),
                             torch.tensor([0, 0, 0, 0, 1, 1]))
    assert keep.tolist() == [False] * 4 + [True, True]
