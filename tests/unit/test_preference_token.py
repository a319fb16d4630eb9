"""T-REG and AlignDistil losses: hand-computed values and gradients (rtol=0), reductions, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from align import functional as F
from align.algorithms import PRESETS
from align.errors import InputError
from align.losses import PREFERENCE_LOSSES, PreferenceInputs, aligndistil_teacher


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(actual: torch.Tensor, expected, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# T-REG
# ---------------------------------------------------------------------------------------------------------------
# one pair: h(y_w) = 0.4, h(y_l) = -0.6 (as test_preference's HAND); the chosen response has a padded third token
LP_W, REF_W = [-1.0, -0.5, -9.0], [-1.2, -0.7, -3.0]
LP_L, REF_L = [-2.0, -1.0, -0.5], [-1.5, -1.0, -0.4]
R_W, R_L = [0.3, -0.4, 0.45], [0.1, 0.0, -0.3]  # token rewards; R_W[2] sits on padding and must not count
REWARDS_W, REWARDS_L = torch.tensor([R_W], dtype=torch.float64), torch.tensor([R_L], dtype=torch.float64)


def treg_inputs() -> tuple[PreferenceInputs, torch.Tensor, torch.Tensor]:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    lp_w, lp_l = t(LP_W).requires_grad_(), t(LP_L).requires_grad_()
    x = PreferenceInputs(chosen_logp=lp_w, rejected_logp=lp_l, chosen_mask=t([1.0, 1.0, 0.0]),
                         rejected_mask=t([1.0, 1.0, 1.0]), ref_chosen_logp=t(REF_W), ref_rejected_logp=t(REF_L))
    return x, lp_w, lp_l


def test_treg_hand_value() -> None:
    x, _, _ = treg_inputs()
    loss, stats = PREFERENCE_LOSSES.get("treg")(x, beta=0.1, alpha=0.5, chosen_token_rewards=REWARDS_W,
                                                rejected_token_rewards=REWARDS_L)
    # L_REG(y_w) = -0.1 (0.3 * -1.0 + -0.4 * -0.5) = 0.01; L_REG(y_l) = -0.1 (0.1 * -2.0 + 0 + -0.3 * -0.5) = 0.005
    # w = sigma(0.1 (-0.6 - 0.4)) = sigma(-0.1); L = softplus(-0.1) + 0.5 * w * 0.015
    expected = softplus(-0.1) + 0.5 * sigmoid(-0.1) * 0.015
    assert expected == pytest.approx(0.6479593161674788, abs=1e-15)
    close(loss, [expected])
    assert stats["treg/sequence_weight"].item() == pytest.approx(sigmoid(-0.1), abs=1e-12)
    assert stats["treg/regulariser"].item() == pytest.approx(0.5 * sigmoid(-0.1) * 0.015, abs=1e-12)


def test_treg_gradient_is_dpo_with_token_weights_one_plus_minus_alpha_r() -> None:
    """dL/dlp^w_t = -beta w (1 + alpha r^w_t), dL/dlp^l_t = beta w (1 - alpha r^l_t), w = sigma(-beta Delta): the
    sequence weight is a constant (a gradient through it would add a term proportional to L_REG)."""
    x, lp_w, lp_l = treg_inputs()
    beta, alpha, w = 0.1, 0.5, sigmoid(-0.1)
    loss, _ = PREFERENCE_LOSSES.get("treg")(x, beta=beta, alpha=alpha, chosen_token_rewards=REWARDS_W,
                                            rejected_token_rewards=REWARDS_L)
    loss.sum().backward()
    assert lp_w.grad is not None and lp_l.grad is not None
    close(lp_w.grad, [[-beta * w * (1 + alpha * 0.3), -beta * w * (1 + alpha * -0.4), 0.0]])
    close(lp_l.grad, [[beta * w * (1 - alpha * 0.1), beta * w * (1 - alpha * 0.0), beta * w * (1 - alpha * -0.3)]])


def test_treg_without_token_rewards_or_alpha_is_dpo() -> None:
    x, _, _ = treg_inputs()
    loss, _ = PREFERENCE_LOSSES.get("treg")(x, beta=0.1)
    dpo, _ = PREFERENCE_LOSSES.get("dpo")(x, beta=0.1)
    close(loss, dpo.detach())
    zero_alpha, _ = PREFERENCE_LOSSES.get("treg")(x, beta=0.1, alpha=0.0, chosen_token_rewards=REWARDS_W)
    close(zero_alpha, dpo.detach())


def test_treg_errors_are_one_line() -> None:
    x, _, _ = treg_inputs()
    with pytest.raises(InputError, match=r"chosen_token_rewards has shape \(1, 2\); it must match"):
        PREFERENCE_LOSSES.get("treg")(x, chosen_token_rewards=torch.zeros(1, 2))
    with pytest.raises(InputError, match="alpha >= 0"):
        PREFERENCE_LOSSES.get("treg")(x, alpha=-0.1)
    with pytest.raises(InputError, match="reference log-probs"):
        PREFERENCE_LOSSES.get("treg")(PreferenceInputs(x.chosen_logp, x.rejected_logp, x.chosen_mask,
                                                       x.rejected_mask))


# ---------------------------------------------------------------------------------------------------------------
# AlignDistil on a 3-token vocabulary
# ---------------------------------------------------------------------------------------------------------------
Z_DPO, Z_REV = [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]
E = math.e
P0 = E / (E + 1 + 1 / E)  # softmax([1, 0, -1])[0]; the other two entries are below 1/3
W = 10 * 2 * (P0 - 1 / 3) + 1e-3  # beta2 * sum_v |p_dpo - 1/3| + eps = 6.63915244882977
A = 1 + W  # z* = z_dpo + W (z_dpo - 0) = A [1, 0, -1]
S = math.exp(A) + 1 + math.exp(-A)
# KL(uniform || softmax(A [1, 0, -1])) = -log 3 - (1/3) sum_v (A z_v - log S) = log(S / 3), as sum_v z_v = 0
KL_UNIFORM = math.log(S / 3)


def test_teacher_hand_values() -> None:
    assert pytest.approx(6.63915244882977, abs=1e-12) == W
    teacher, weight = aligndistil_teacher(torch.tensor([Z_DPO], dtype=torch.float64),
                                          torch.tensor([Z_REV], dtype=torch.float64), beta2=10.0)
    close(weight, [W])
    close(teacher, [[A, 0.0, -A]])
    # equal models: no extrapolation and the floor weight; shifting one model's logits changes nothing
    same, w_same = aligndistil_teacher(torch.tensor([Z_DPO]), torch.tensor([Z_DPO]) + 5.0)
    close(w_same, [1e-3], atol=1e-6)
    close(torch.softmax(same, -1), torch.softmax(torch.tensor([Z_DPO]), -1), atol=1e-6)


def one_token_pair(student: list[float], vocab_logits: dict[str, list[float]] | None = None):
    """A pair with one chosen and one rejected token; all logits (1, 1, 3)."""
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    z_w, z_l = t(student).requires_grad_(), t(student).requires_grad_()
    ids = torch.tensor([[0]])
    x = PreferenceInputs(chosen_logp=torch.log_softmax(z_w, -1).gather(-1, ids[..., None]).squeeze(-1),
                         rejected_logp=torch.log_softmax(z_l, -1).gather(-1, ids[..., None]).squeeze(-1),
                         chosen_mask=torch.ones(1, 1, dtype=torch.float64),
                         rejected_mask=torch.ones(1, 1, dtype=torch.float64))
    extras = {k: t(v) for k, v in (vocab_logits or {}).items()}
    return x, z_w, z_l, {"chosen_logits": z_w, "rejected_logits": z_l, **extras}


def teacher_extras(side: str) -> dict[str, list[float]]:
    return {f"{side}_dpo_logits": Z_DPO, f"{side}_reverse_logits": Z_REV}


def test_aligndistil_hand_value_and_gradient_uniform_student() -> None:
    x, z_w, _, kw = one_token_pair([0.0, 0.0, 0.0], teacher_extras("chosen"))
    loss, stats = PREFERENCE_LOSSES.get("aligndistil")(x, beta=0.1, responses="chosen", **kw)
    assert pytest.approx(6.541021512033016, abs=1e-12) == KL_UNIFORM
    close(loss, [0.1 / W * KL_UNIFORM])  # one token: length normalisation divides by 1
    assert stats["aligndistil/kl_to_teacher"].item() == pytest.approx(KL_UNIFORM, abs=1e-12)
    assert stats["aligndistil/teacher_weight"].item() == pytest.approx(W, abs=1e-12)
    loss.sum().backward()
    # d KL(p || q) / d z_v = p_v (log p_v - log q_v - KL) = (1/3)(-A z_v) for the uniform p: reverse KL, student first
    assert z_w.grad is not None
    close(z_w.grad, [[[-0.1 / W * A / 3, 0.0, 0.1 / W * A / 3]]])


def test_aligndistil_gradient_matches_the_reverse_kl_formula_for_any_student() -> None:
    student = [0.5, -1.0, 2.0]
    x, z_w, _, kw = one_token_pair(student, teacher_extras("chosen"))
    loss, _ = PREFERENCE_LOSSES.get("aligndistil")(x, beta=0.1, responses="chosen", temperature=2.0, **kw)
    loss.sum().backward()
    p = torch.softmax(torch.tensor(student, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.tensor([A, 0.0, -A], dtype=torch.float64) / 2.0, -1)  # z* / tau
    kl = (p * (p.log() - log_q)).sum()
    close(loss, [0.1 / W * kl.item()])
    assert z_w.grad is not None
    close(z_w.grad[0, 0], 0.1 / W * p * (p.log() - log_q - kl))


def test_aligndistil_both_responses_average_and_chosen_only_ignores_rejected() -> None:
    extras = {**teacher_extras("chosen"), "rejected_dpo_logits": Z_REV, "rejected_reverse_logits": Z_DPO}
    x, _, z_l, kw = one_token_pair([0.0, 0.0, 0.0], extras)
    both, _ = PREFERENCE_LOSSES.get("aligndistil")(x, beta=0.1, **kw)
    # rejected teacher: z* = z_rev_as_dpo + w (0 - [1, 0, -1]) = -W [1, 0, -1]: KL(uniform || .) = log(S' / 3)
    kl_rejected = math.log((math.exp(W) + 1 + math.exp(-W)) / 3)
    close(both, [0.5 * (0.1 / W * KL_UNIFORM + 0.1 / W * kl_rejected)])
    chosen_only, _ = PREFERENCE_LOSSES.get("aligndistil")(x, beta=0.1, responses="chosen", **kw)
    chosen_only.sum().backward()
    assert z_l.grad is None or z_l.grad.abs().sum() == 0
    close(chosen_only, [0.1 / W * KL_UNIFORM])


def test_aligndistil_length_normalisation_and_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    dpo, rev = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64), torch.randn(1, 3, 3, generator=gen,
                                                                                   dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)[..., 0]
    x = PreferenceInputs(chosen_logp=lp, rejected_logp=lp.detach(), chosen_mask=mask, rejected_mask=mask)
    kw = {"chosen_logits": logits, "chosen_dpo_logits": dpo, "chosen_reverse_logits": rev, "responses": "chosen"}
    summed, _ = PREFERENCE_LOSSES.get("aligndistil")(x, length_normalize=False, **kw)
    normalised, _ = PREFERENCE_LOSSES.get("aligndistil")(x, **kw)
    teacher, weight = aligndistil_teacher(dpo, rev)
    p, log_q = torch.softmax(logits.detach(), -1), torch.log_softmax(teacher, -1)
    per_token = 0.1 / weight * (p * (p.log() - log_q)).sum(-1)  # (1, 3)
    close(summed, [per_token[0, :2].sum().item()])
    close(normalised, [per_token[0, :2].sum().item() / 2])
    normalised.sum().backward()
    assert logits.grad is not None and logits.grad[0, 2].abs().sum() == 0  # nothing reaches the padding


def test_aligndistil_without_teacher_logits_uses_the_reference_for_both() -> None:
    x, _, _, kw = one_token_pair([0.5, -1.0, 2.0])
    ref = torch.tensor([[Z_DPO]], dtype=torch.float64)
    loss, stats = PREFERENCE_LOSSES.get("aligndistil")(x, ref_chosen_logits=ref, ref_rejected_logits=ref, **kw)
    explicit, _ = PREFERENCE_LOSSES.get("aligndistil")(x, chosen_dpo_logits=ref, chosen_reverse_logits=ref,
                                                       rejected_dpo_logits=ref, rejected_reverse_logits=ref, **kw)
    close(loss, explicit.detach())
    assert stats["aligndistil/teacher_weight"].item() == pytest.approx(1e-3, abs=1e-12)
    with pytest.raises(InputError, match="chosen_dpo_logits and chosen_reverse_logits"):
        PREFERENCE_LOSSES.get("aligndistil")(x, **kw)


def test_aligndistil_errors_are_one_line() -> None:
    x, _, _, kw = one_token_pair([0.0, 0.0, 0.0], teacher_extras("chosen"))
    fn = PREFERENCE_LOSSES.get("aligndistil")
    with pytest.raises(InputError, match="responses must be one of both, chosen"):
        fn(x, responses="rejected", **kw)
    with pytest.raises(InputError, match="both chosen_dpo_logits and chosen_reverse_logits"):
        fn(x, responses="chosen", chosen_logits=kw["chosen_logits"], chosen_dpo_logits=kw["chosen_dpo_logits"])
    with pytest.raises(InputError, match=r"must both be \(B, T, V\)"):
        fn(x, responses="chosen", chosen_logits=kw["chosen_logits"], chosen_dpo_logits=torch.zeros(1, 1, 4),
           chosen_reverse_logits=torch.zeros(1, 1, 4))
    with pytest.raises(InputError, match=r"must have the same \(\.\.\., V\) shape \(one tokenizer\)"):
        fn(x, responses="chosen", chosen_logits=kw["chosen_logits"], chosen_dpo_logits=torch.zeros(1, 1, 3),
           chosen_reverse_logits=torch.zeros(1, 1, 4))
    with pytest.raises(InputError, match="needs the policy's full-vocabulary logits"):
        fn(x, responses="chosen")


def test_presets_and_functional_entry() -> None:
    treg, distil = PRESETS.get("treg"), PRESETS.get("aligndistil")
    assert (treg.preference_loss, treg.has_reference) == ("treg", True)
    assert (distil.preference_loss, distil.has_reference) == ("aligndistil", False)
    assert PREFERENCE_LOSSES.info("aligndistil")["needs_logits"] and not PREFERENCE_LOSSES.info("treg").get(
        "needs_logits")
    x, _, _ = treg_inputs()
    loss, metrics = F.preference_loss("treg", chosen_logp=x.chosen_logp, rejected_logp=x.rejected_logp,
                                      ref_chosen_logp=x.ref_chosen_logp, ref_rejected_logp=x.ref_rejected_logp,
                                      chosen_mask=x.chosen_mask, rejected_mask=x.rejected_mask, beta=0.1)
    assert loss.item() == pytest.approx(softplus(-0.1), abs=1e-12)  # no token rewards: DPO
    assert metrics["treg/regulariser"] == 0.0
