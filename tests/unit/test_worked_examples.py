"""Every worked number of spec §10, reproduced at rtol=0, atol<=1e-6 (float64 throughout)."""

from __future__ import annotations

import math

import pytest
import torch

from align import functional as F
from align.algorithms import DAPO, DR_GRPO, GRPO, GSPO, PRESETS
from align.losses.conflict import conflict_weights

from ..conftest import Batch, mask_from_lengths

ATOL = 1e-6
BESSEL_A = 0.8660254  # (1 - 0.5) / sqrt(1/3)


def close(actual: torch.Tensor, expected: list[float] | float) -> None:
    want = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), want.expand_as(actual), rtol=0, atol=ATOL)


def gradient_coefficients(spec, worked: Batch, adv: torch.Tensor, log_ratio: torch.Tensor | None = None):
    """c = dJ/dlogp = -dloss/dlogp, and the objective J = -loss."""
    log_ratio = torch.zeros_like(worked.mask) if log_ratio is None else log_ratio
    logp = log_ratio.clone().requires_grad_(True)
    loss, _ = F.policy_objective(spec, logp=logp, old_logp=torch.zeros_like(logp), advantages=adv, mask=worked.mask)
    loss.backward()
    return -logp.grad, -loss.detach()


def no_kl(spec):
    return spec.with_options(kl=None, kl_coef=0.0)


# --- advantages ------------------------------------------------------------------------------------------------
def test_grpo_advantages_bessel(worked: Batch) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    close(adv[:, 0], [BESSEL_A, -BESSEL_A, -BESSEL_A, BESSEL_A])
    close(adv * worked.mask, adv)  # 0 off-mask


@pytest.mark.parametrize(("eps", "expected"), [(1e-4, 0.8658754), (1e-6, 0.8660239)])
def test_grpo_advantages_eps_guards(worked: Batch, eps: float, expected: float) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=eps)
    close(adv[:, 0], [expected, -expected, -expected, expected])


def test_grpo_default_eps_is_verl_guard(worked: Batch) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids)
    close(adv[0, 0], 0.8660239)


def test_dr_grpo_advantages(worked: Batch) -> None:
    adv = F.advantages("dr_grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids)
    close(adv[:, 0], [0.5, -0.5, -0.5, 0.5])
    doubled = F.advantages("dr_grpo", rewards=2 * worked.rewards - 1, mask=worked.mask, group_ids=worked.group_ids)
    close(doubled[:, 0], [1.0, -1.0, -1.0, 1.0])  # +-1 rewards double Dr. GRPO's advantage


def test_dapo_signed_rewards_give_same_grpo_advantage(worked: Batch) -> None:
    adv = F.advantages("grpo", rewards=2 * worked.rewards - 1, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    close(adv[:, 0], [BESSEL_A, -BESSEL_A, -BESSEL_A, BESSEL_A])


def test_rloo_advantages(worked: Batch) -> None:
    adv = F.advantages("rloo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids)
    close(adv[:, 0], [2 / 3, -2 / 3, -2 / 3, 2 / 3])


@pytest.mark.parametrize(("ddof", "expected"), [(0, 1.0), (1, 0.9636241)])
def test_reinforce_pp_baseline(worked: Batch, ddof: int, expected: float) -> None:
    adv = F.advantages("reinforce_pp_baseline", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids,
                       ddof=ddof)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64).unsqueeze(-1)
    close(adv, expected * sign * worked.mask)


# --- per-token gradient coefficients at rho = 1 ----------------------------------------------------------------
def test_grpo_coefficients(worked: Batch) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    c, objective = gradient_coefficients(no_kl(GRPO), worked, adv)
    close(c[:, 0], [0.0721688, -0.0433013, -0.1082532, 0.0541266])
    close(c.sum(-1), [0.2165064, -0.2165064, -0.2165064, 0.2165064])
    close(c * (1 - worked.mask), 0.0)
    close(objective, 0.0)


def test_grpo_population_std_coefficients(worked: Batch) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0, ddof=0)
    close(adv[:, 0], [1.0, -1.0, -1.0, 1.0])
    c, _ = gradient_coefficients(no_kl(GRPO), worked, adv)
    close(c[:, 0], [1 / 12, -1 / 20, -1 / 8, 1 / 16])


def test_dr_grpo_coefficients(worked: Batch) -> None:
    adv = F.advantages("dr_grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids)
    c, objective = gradient_coefficients(DR_GRPO.with_options(generation_budget=8), worked, adv)
    close(c[:, 0], [0.015625, -0.015625, -0.015625, 0.015625])
    close(c.sum(-1), [0.046875, -0.078125, -0.03125, 0.0625])
    close(objective, 0.0)


def test_dr_grpo_default_length_norm_is_padded_length(worked: Batch) -> None:
    adv = F.advantages("dr_grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids)
    c, _ = gradient_coefficients(DR_GRPO, worked, adv)  # T = 5 here
    close(c[:, 0], [0.5 / 20, -0.5 / 20, -0.5 / 20, 0.5 / 20])


def test_dapo_coefficients(worked: Batch) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    c, objective = gradient_coefficients(DAPO, worked, adv)
    close(c[:, 0], [0.0618590, -0.0618590, -0.0618590, 0.0618590])
    close(c.sum(-1), [0.1855769, -0.3092948, -0.1237179, 0.2474358])
    close(objective, 0.0)


def test_gspo_at_ratio_one_has_grpo_coefficients(worked: Batch) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    c_gspo, _ = gradient_coefficients(GSPO, worked, adv)
    c_grpo, _ = gradient_coefficients(no_kl(GRPO), worked, adv)
    close(c_gspo, c_grpo.tolist())


# --- the perturbed-ratio case ----------------------------------------------------------------------------------
@pytest.fixture
def perturbed(worked: Batch) -> torch.Tensor:
    log_ratio = torch.zeros_like(worked.mask)
    log_ratio[0, 0] = math.log(1.25)  # A > 0
    log_ratio[1, 0] = math.log(0.75)  # A < 0
    return log_ratio


def test_perturbed_grpo(worked: Batch, perturbed: torch.Tensor) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    c, objective = gradient_coefficients(no_kl(GRPO), worked, adv, perturbed)
    close(objective, 0.0230940)
    close(c[0, 0], 0.0)  # 1.25 > 1.2: clipped
    close(c[1, 0], 0.0)  # 0.75 < 0.8: clipped


def test_perturbed_surrogate_sums(worked: Batch, perturbed: torch.Tensor) -> None:
    from align.losses.policy import PolicyInputs, ppo_clip

    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    inputs = PolicyInputs(perturbed, torch.zeros_like(perturbed), adv, worked.mask)
    close(-ppo_clip(inputs, eps_low=0.2)[0].sum(-1), [2.7712813, -4.1569219, -1.7320508, 3.4641016])
    close(-ppo_clip(inputs, eps_low=0.2, eps_high=0.28)[0].sum(-1)[0], 2.8145826)


def test_perturbed_dr_grpo(worked: Batch, perturbed: torch.Tensor) -> None:
    adv = F.advantages("dr_grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids)
    c, objective = gradient_coefficients(DR_GRPO.with_options(generation_budget=8), worked, adv, perturbed)
    close(objective, 0.00625)
    close(c[0, 0], 0.0)
    close(c[1, 0], 0.0)


def test_perturbed_dapo(worked: Batch, perturbed: torch.Tensor) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    c, objective = gradient_coefficients(DAPO, worked, adv, perturbed)
    close(objective, 0.0278365)
    close(c[0, 0], 0.0773243)  # 1.25 <= 1.28: not clipped under clip-higher
    close(c[1, 0], 0.0)


def test_gspo_clips_rows_outside_its_tiny_range(worked: Batch) -> None:
    adv = F.advantages("grpo", rewards=worked.rewards, mask=worked.mask, group_ids=worked.group_ids, eps=0.0)
    log_ratio = torch.zeros_like(worked.mask)
    log_ratio[0] = math.log(1.0 + 5e-4) * worked.mask[0]  # s_0 = 1.0005 > 1 + 4e-4, A > 0: clipped
    log_ratio[3] = math.log(1.0 + 3e-4) * worked.mask[3]  # s_3 = 1.0003 inside: not clipped
    c, _ = gradient_coefficients(GSPO, worked, adv, log_ratio)
    close(c[0], 0.0)
    close(c[3, :4], [1.0003 * BESSEL_A / 4 / 4] * 4)


# --- GTPO conflict example -------------------------------------------------------------------------------------
GTPO_TOKENS = [[5, 7, 9], [5, 7, 8, 2, 9], [5, 6], [5, 7, 3, 9]]


def gtpo_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = mask_from_lengths([len(t) for t in GTPO_TOKENS])
    ids = torch.zeros(mask.shape, dtype=torch.long)
    for i, row in enumerate(GTPO_TOKENS):
        ids[i, : len(row)] = torch.tensor(row)
    sign = torch.tensor([1, -1, -1, 1])
    return ids, mask, torch.zeros(4, dtype=torch.long), sign


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("prefix_suffix", [[2, 2, 2], [0, 0, 1, 1, 0], [0, 1], [2, 2, 1, 2]]),
        ("any_position", [[2, 2, 1], [0, 0, 1, 1, 1], [0, 1], [2, 2, 1, 1]]),
    ],
)
def test_gtpo_conflict_weights(mode: str, expected: list[list[int]]) -> None:
    ids, mask, groups, sign = gtpo_batch()
    weights, _ = conflict_weights(ids, mask, groups, sign, mode=mode)
    for i, row in enumerate(expected):
        assert weights[i, : len(row)].tolist() == row
        assert weights[i, len(row) :].abs().sum() == 0


def test_gtpo_shifted_advantage() -> None:
    ids, mask, groups, _ = gtpo_batch()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv = F.advantages("dr_grpo", rewards=rewards, mask=mask, group_ids=groups)
    entropy = torch.tensor([0.2, 0.5, 0.9, 0.7], dtype=torch.float64).unsqueeze(-1).expand_as(mask).clone()
    logp = torch.zeros_like(mask, requires_grad=True)
    loss, metrics = F.policy_objective(PRESETS.get("gtpo"), logp=logp, old_logp=torch.zeros_like(mask),
                                       advantages=adv, mask=mask, entropy=entropy, token_ids=ids, group_ids=groups)
    loss.backward()
    shifted = [0.5 - 0.02, -0.5 - 0.05, 0.0, 0.5 - 0.07]  # row 2: <H> = 0.9 > 0.7, filtered out
    weights = [[2, 2, 2], [0, 0, 1, 1, 0], [0, 1], [2, 2, 1, 2]]
    lengths = [3, 5, 2, 4]
    expected_objective = sum(a * sum(w) / n for a, w, n in zip(shifted, weights, lengths, strict=True)) / 4
    close(-loss.detach(), expected_objective)
    for i, (a, w, n) in enumerate(zip(shifted, weights, lengths, strict=True)):
        close(-logp.grad[i, :n], [a * wt / n / 4 for wt in w])
    close(torch.tensor(metrics["entropy_filtered_frac"]), 0.25)


@pytest.mark.parametrize("sum_over_group", [False, True])
def test_gtpo_averages_completions_by_default_and_sums_them_as_the_authors_on_request(sum_over_group: bool) -> None:
    """The same example, G = 4 completions of one prompt: A'_i = A_i - 0.1 <H>_i = [0.5 - 0.02, -0.5 - 0.05, filtered
    (<H> = 0.9 > 0.7), 0.5 - 0.07]. Default (the preset): per-completion losses averaged,
    J = (1/4) sum_i A'_i sum_t lambda_{i,t} / L_i = (1/4)(0.48 * 6/3 - 0.55 * 2/5 + 0 + 0.43 * 7/4) = 0.373125,
    and the gradient of token (i, t) is A'_i lambda_{i,t} / L_i / 4. The authors' code sums the G per-completion
    losses (``sum_over_group=True``): every value and gradient is G = 4 times larger, J = 1.4925.
    """
    ids, mask, groups, _ = gtpo_batch()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv = F.advantages("dr_grpo", rewards=rewards, mask=mask, group_ids=groups)
    entropy = torch.tensor([0.2, 0.5, 0.9, 0.7], dtype=torch.float64).unsqueeze(-1).expand_as(mask).clone()
    logp = torch.zeros_like(mask, requires_grad=True)
    spec = PRESETS.get("gtpo").with_options(loss_kwargs={"sum_over_group": sum_over_group})
    loss, _ = F.policy_objective(spec, logp=logp, old_logp=torch.zeros_like(mask), advantages=adv, mask=mask,
                                 entropy=entropy, token_ids=ids, group_ids=groups)
    loss.backward()
    factor = 4.0 if sum_over_group else 1.0
    close(-loss.detach(), factor * 0.373125)
    shifted, lengths = [0.48, -0.55, 0.0, 0.43], [3, 5, 2, 4]
    weights = [[2, 2, 2], [0, 0, 1, 1, 0], [0, 1], [2, 2, 1, 2]]
    for i, (a, w, n) in enumerate(zip(shifted, weights, lengths, strict=True)):
        close(-logp.grad[i, :n], [factor * a * wt / n / 4 for wt in w])
