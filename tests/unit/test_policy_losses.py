"""Policy losses and KL estimators: hand-computed values, gradients and equivalences."""

from __future__ import annotations

import math

import pytest
import torch

from align import functional as F
from align.algorithms import GRPO, GSPO, GSPO_TOKEN, AlgorithmSpec
from align.errors import InputError
from align.losses import KL_ESTIMATORS, kl_reward_penalty
from align.losses.policy import PolicyInputs, cispo, gspo, gspo_token, gtpo, ppo_clip, reinforce

from ..conftest import random_batch


def one_token(ratio: float, adv: float) -> tuple[PolicyInputs, torch.Tensor]:
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    return PolicyInputs(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[adv]], dtype=torch.float64),
                        torch.ones(1, 1, dtype=torch.float64)), logp


@pytest.mark.parametrize(
    ("ratio", "adv", "kwargs", "loss", "grad"),
    [
        (1.1, 2.0, {}, -2.2, -2.2),  # inside the range: -rA, d/dlogp = -rA
        (1.5, 2.0, {}, -2.4, 0.0),  # A > 0 above 1 + eps: clipped
        (0.5, 2.0, {}, -1.0, -1.0),  # A > 0 below 1 - eps: one-sided, not clipped
        (0.5, -1.0, {}, 0.8, 0.0),  # A < 0 below 1 - eps: clipped
        (1.25, 1.0, {"eps_high": 0.28}, -1.25, -1.25),  # clip-higher keeps it
        (5.0, -1.0, {"dual_clip": 3.0}, 3.0, 0.0),  # dual clip caps the loss at -cA
        (2.0, -1.0, {"dual_clip": 3.0}, 2.0, 2.0),  # below the cap: plain PPO
    ],
)
def test_ppo_clip_cases(ratio: float, adv: float, kwargs: dict, loss: float, grad: float) -> None:
    x, logp = one_token(ratio, adv)
    out, _ = ppo_clip(x, **kwargs)
    out.sum().backward()
    assert out.item() == pytest.approx(loss, abs=1e-12)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-12)


def test_ppo_clip_rejects_bad_ranges() -> None:
    x, _ = one_token(1.0, 1.0)
    with pytest.raises(InputError, match="dual_clip must be > 1"):
        ppo_clip(x, dual_clip=0.5)
    with pytest.raises(InputError, match="clip ranges"):
        ppo_clip(x, eps_low=-0.1)


def test_reinforce_value_and_gradient_ignore_ratio() -> None:
    x, logp = one_token(3.0, 0.5)
    out, _ = reinforce(x)
    out.sum().backward()
    assert out.item() == pytest.approx(-0.5)
    assert logp.grad.item() == pytest.approx(-0.5)


@pytest.mark.parametrize(("ratio", "weight"), [(2.0, 1.28), (0.3, 0.3), (1.1, 1.1)])
def test_cispo_keeps_gradient_with_truncated_weight(ratio: float, weight: float) -> None:
    x, logp = one_token(ratio, 2.0)
    out, _ = cispo(x)
    out.sum().backward()
    assert logp.grad.item() == pytest.approx(-weight * 2.0, abs=1e-12)
    assert out.item() == pytest.approx(-weight * 2.0, abs=1e-12)


def test_gspo_token_equals_gspo_for_row_constant_advantages() -> None:
    b = random_batch(11)
    adv = F.advantages("grpo", rewards=b["rewards"], mask=b["mask"], group_ids=b["group_ids"])
    near = b["logp"] + 2e-4 * torch.randn(b["logp"].shape, dtype=torch.float64)  # ratios near the tiny clip range
    results = []
    for loss_fn in (gspo, gspo_token):
        logp = near.clone().requires_grad_(True)
        out, _ = loss_fn(PolicyInputs(logp, b["logp"], adv, b["mask"]))
        (out.sum(-1) / b["mask"].sum(-1).clamp(min=1)).sum().backward()
        results.append((out.detach(), logp.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)


def test_gspo_refuses_per_token_advantages() -> None:
    b = random_batch(12)
    with pytest.raises(InputError, match="use gspo_token"):
        gspo(PolicyInputs(b["logp"], b["old_logp"], torch.randn(b["mask"].shape, dtype=torch.float64), b["mask"]))


def test_gspo_and_gspo_token_presets_agree_through_the_facade() -> None:
    b = random_batch(13)
    adv = F.advantages("grpo", rewards=b["rewards"], mask=b["mask"], group_ids=b["group_ids"])
    losses = [F.policy_objective(spec, logp=b["logp"], old_logp=b["logp"], advantages=adv, mask=b["mask"])[0]
              for spec in (GSPO, GSPO_TOKEN)]
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-12)


def test_gtpo_needs_group_inputs_and_options_work() -> None:
    b = random_batch(14)
    adv = F.advantages("dr_grpo", rewards=b["rewards"], mask=b["mask"], group_ids=b["group_ids"])
    x = PolicyInputs(b["logp"], b["logp"], adv, b["mask"])
    with pytest.raises(InputError, match="gtpo needs token_ids, group_ids, entropy"):
        gtpo(x)
    full = PolicyInputs(b["logp"], b["logp"], adv, b["mask"], token_ids=b["token_ids"], group_ids=b["group_ids"],
                        entropy=b["entropy"] * 0.1)
    plain, _ = gtpo(full, entropy_coef=0.0)
    divided, _ = gtpo(full, entropy_coef=0.0, divide_by_conflicts=True)
    from align.losses.conflict import conflict_weights

    _, n_conf = conflict_weights(b["token_ids"], b["mask"], b["group_ids"], torch.sign(adv.sum(-1)))
    torch.testing.assert_close(divided, plain / n_conf.clamp(min=1).unsqueeze(-1).double(), rtol=0, atol=1e-12)
    # the authors' sum over a prompt's completions: x the group's trainable completions (group 0 holds the
    # zero-length row 1, so 3 of its 4 rows count; groups 1 and 2 have 4)
    summed, _ = gtpo(full, entropy_coef=0.0, sum_over_group=True)
    factor = torch.tensor([3.0] * 4 + [4.0] * 8, dtype=torch.float64).unsqueeze(-1)
    torch.testing.assert_close(summed, plain * factor, rtol=0, atol=1e-12)
    unfiltered, stats = gtpo(PolicyInputs(b["logp"], b["logp"], adv, b["mask"], token_ids=b["token_ids"],
                                          group_ids=b["group_ids"], entropy=b["entropy"] + 5.0),
                             entropy_threshold=None, entropy_coef=0.0)
    torch.testing.assert_close(unfiltered, plain, rtol=0, atol=1e-12)
    assert stats["entropy_filtered_frac"].item() == 0.0


def test_gtpo_without_signed_groups_has_unit_weights() -> None:
    b = random_batch(15)
    mask = b["mask"]
    adv = torch.zeros_like(mask)  # all rewards equal: no positive/negative rows
    x = PolicyInputs(b["logp"], b["logp"], adv, mask, token_ids=b["token_ids"], group_ids=b["group_ids"],
                     entropy=torch.full_like(mask, 0.5))
    loss, stats = gtpo(x)
    # the entropy shift alone: -(0 - 0.1 * 0.5) * 1 * ratio(=1)
    torch.testing.assert_close(loss, 0.05 * mask, rtol=0, atol=1e-12)
    assert stats["conflict_token_frac"].item() == 0.0


# --- KL ------------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_values_and_k3_plus_gradient() -> None:
    d = torch.tensor([[0.5, -0.3]], dtype=torch.float64)
    ref = torch.zeros_like(d)
    expected = {
        "k1": [0.5, -0.3],
        "k2": [0.125, 0.045],
        "k3": [math.exp(-0.5) - 0.5, math.exp(0.3) - 1.3],
        "k3_plus": [math.exp(-0.5) - 0.5, math.exp(0.3) - 1.3],
    }
    for name, values in expected.items():
        torch.testing.assert_close(KL_ESTIMATORS.get(name)(d, ref), torch.tensor([values], dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    a = d.clone().requires_grad_(True)
    KL_ESTIMATORS.get("k3_plus")(a, ref).sum().backward()
    torch.testing.assert_close(a.grad, d, rtol=0, atol=1e-12)  # k2's gradient: d


def test_k3_is_clamped_against_overflow() -> None:
    out = KL_ESTIMATORS.get("k3")(torch.tensor([[-50.0]]), torch.tensor([[0.0]]))
    assert torch.isfinite(out).all()
    assert out.item() == 10.0


def test_kl_reward_penalty_is_detached_and_masked() -> None:
    old = torch.tensor([[0.2, 0.4, 9.0]], requires_grad=True)
    ref = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    penalty = kl_reward_penalty(old, ref, mask, coef=0.5)
    assert not penalty.requires_grad
    torch.testing.assert_close(penalty, torch.tensor([[-0.1, -0.2, 0.0]]), rtol=0, atol=1e-7)


def test_grpo_kl_term_in_loss() -> None:
    b = random_batch(16)
    mask = b["mask"]
    adv = F.advantages("grpo", rewards=b["rewards"], mask=mask, group_ids=b["group_ids"])
    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = F.policy_objective(GRPO, logp=logp, old_logp=b["logp"], advantages=adv, mask=mask,
                                       ref_logp=b["ref_logp"])
    no_kl = GRPO.with_options(kl=None, kl_coef=0.0)
    pg, _ = F.policy_objective(no_kl, logp=b["logp"], old_logp=b["logp"], advantages=adv, mask=mask)
    d = (b["logp"] - b["ref_logp"])
    k3 = (torch.exp(-d) - 1 + d) * mask
    lengths = mask.sum(-1)
    kl = ((k3.sum(-1) / lengths.clamp(min=1))[lengths > 0]).mean()
    assert loss.item() == pytest.approx(pg.item() + 0.04 * kl.item(), abs=1e-12)
    assert metrics["kl"] == pytest.approx(kl.item(), abs=1e-12)
    with pytest.raises(InputError, match="pass ref_logp"):
        F.policy_objective(GRPO, logp=logp, old_logp=b["logp"], advantages=adv, mask=mask)


def test_custom_spec_runs_through_facade() -> None:
    spec = AlgorithmSpec(name="cispo_dapo", advantage="grpo", policy_loss="cispo", reducer="token_mean")
    b = random_batch(17)
    adv = F.advantages("grpo", rewards=b["rewards"], mask=b["mask"], group_ids=b["group_ids"])
    loss, metrics = F.policy_objective(spec, logp=b["logp"], old_logp=b["old_logp"], advantages=adv, mask=b["mask"])
    assert math.isfinite(loss.item())
    assert "clip_frac" in metrics
