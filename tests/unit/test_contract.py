"""A contract over every registry entry: shape, dtype, finite output, gradient only where the mask is 1."""

from __future__ import annotations

import pytest
import torch

from align.advantages import ADVANTAGES
from align.losses import KL_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES, REDUCERS, PolicyInputs, StepNormalizer
from align.losses.preference import PreferenceInputs
from align.objective import validate_policy_inputs

from ..conftest import random_batch


def masked_grad_ok(grad: torch.Tensor | None, mask: torch.Tensor) -> None:
    assert grad is not None, "no gradient reached the policy log-probs"
    assert torch.isfinite(grad).all()
    assert grad[mask == 0].abs().sum() == 0, "gradient leaked to masked positions"
    assert grad[mask != 0].abs().sum() > 0, "no gradient on trainable positions"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_policy_loss_contract(name: str, dtype: torch.dtype) -> None:
    b = random_batch(31)
    mask = b["mask"].to(dtype)
    estimator = "dr_grpo" if name == "gtpo" else "grpo"
    adv = ADVANTAGES.get(estimator)(b["rewards"] + 0.1 * torch.arange(12), mask, b["group_ids"]).to(dtype)
    logp = b["logp"].to(dtype).clone()
    logp[mask == 0] = float("nan")  # garbage padding must not leak
    logp.requires_grad_(True)
    x = validate_policy_inputs(PolicyInputs(logp, b["old_logp"].to(dtype), adv, mask, token_ids=b["token_ids"],
                                            group_ids=b["group_ids"], entropy=(0.3 * b["entropy"]).to(dtype)))
    loss, stats = POLICY_LOSSES.get(name)(x)
    assert loss.shape == mask.shape
    assert loss.dtype == dtype
    assert torch.isfinite(loss).all()
    assert loss[mask == 0].abs().sum() == 0
    assert all(not v.requires_grad and v.dim() == 0 and torch.isfinite(v) for v in stats.values())
    loss.sum().backward()
    masked_grad_ok(logp.grad, mask)


@pytest.mark.parametrize("name", REDUCERS.names())
def test_reducer_contract(name: str) -> None:
    b = random_batch(32)
    mask = b["mask"]
    loss = torch.randn(mask.shape, dtype=torch.float64).masked_fill(mask == 0, float("inf")).requires_grad_(True)
    out = REDUCERS.get(name)(loss, mask, StepNormalizer.from_masks(mask))
    assert out.dim() == 0
    assert torch.isfinite(out)
    out.backward()
    masked_grad_ok(loss.grad, mask)


@pytest.mark.parametrize("name", REDUCERS.names())
def test_reducers_on_a_fully_masked_step_give_zero_with_a_graph(name: str) -> None:
    mask = torch.zeros(2, 3)
    loss = torch.randn(2, 3, requires_grad=True)
    out = REDUCERS.get(name)(loss, mask, StepNormalizer.from_masks(mask))
    assert out.item() == 0.0
    out.backward()
    assert loss.grad is not None and loss.grad.abs().sum() == 0


@pytest.mark.parametrize("name", KL_ESTIMATORS.names())
def test_kl_estimator_contract(name: str) -> None:
    b = random_batch(33)
    logp = b["logp"].clone().requires_grad_(True)
    out = KL_ESTIMATORS.get(name)(logp, b["ref_logp"])
    assert out.shape == logp.shape
    assert torch.isfinite(out).all()
    if name != "k1":
        assert (out >= -1e-12).all()
    (out * b["mask"]).sum().backward()
    masked_grad_ok(logp.grad, b["mask"])


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_advantage_contract(name: str) -> None:
    b = random_batch(34)
    mask = b["mask"]
    rewards = (b["rewards"] + 0.1 * torch.arange(12)).requires_grad_(True)
    kw = {"values": torch.rand(mask.shape, dtype=torch.float64)} if name == "gae" else {}
    adv = ADVANTAGES.get(name)(rewards, mask, b["group_ids"], **kw)
    assert adv.shape == mask.shape
    assert adv.dtype == torch.float64
    assert torch.isfinite(adv).all()
    assert adv[mask == 0].abs().sum() == 0
    assert adv[mask != 0].abs().sum() > 0
    assert not adv.requires_grad, "advantages must be detached"
    if ADVANTAGES.info(name)["granularity"] == "sequence":  # row-constant output
        for i in range(mask.shape[0]):
            row = adv[i][mask[i] != 0]
            assert row.numel() == 0 or bool((row == row[0]).all())


def preference_inputs(seed: int, vocab: int = 7) -> tuple[PreferenceInputs, dict, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    chosen_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    rejected_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    logits_c = torch.randn(2, 4, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    logits_r = torch.randn(2, 3, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    ids_c, ids_r = torch.randint(0, vocab, (2, 4), generator=gen), torch.randint(0, vocab, (2, 3), generator=gen)
    logp_c = torch.log_softmax(logits_c, -1).gather(-1, ids_c.unsqueeze(-1)).squeeze(-1)
    logp_r = torch.log_softmax(logits_r, -1).gather(-1, ids_r.unsqueeze(-1)).squeeze(-1)
    ref_c = torch.randn(2, 4, vocab, generator=gen, dtype=torch.float64)
    ref_r = torch.randn(2, 3, vocab, generator=gen, dtype=torch.float64)
    x = PreferenceInputs(
        chosen_logp=logp_c * chosen_mask, rejected_logp=logp_r * rejected_mask,
        chosen_mask=chosen_mask, rejected_mask=rejected_mask,
        ref_chosen_logp=torch.log_softmax(ref_c, -1).gather(-1, ids_c.unsqueeze(-1)).squeeze(-1) * chosen_mask,
        ref_rejected_logp=torch.log_softmax(ref_r, -1).gather(-1, ids_r.unsqueeze(-1)).squeeze(-1) * rejected_mask,
    )
    extras = {"chosen_logits": logits_c, "rejected_logits": logits_r, "ref_chosen_logits": ref_c,
              "ref_rejected_logits": ref_r}
    return x, extras, [logits_c, logits_r]


@pytest.mark.parametrize("name", PREFERENCE_LOSSES.names())
def test_preference_loss_contract(name: str) -> None:
    x, extras, leaves = preference_inputs(35)
    kw = extras if PREFERENCE_LOSSES.info(name).get("needs_logits") else {}
    loss, stats = PREFERENCE_LOSSES.get(name)(x, **kw)
    assert loss.shape == (2,)
    assert torch.isfinite(loss).all()
    assert all(not v.requires_grad and torch.isfinite(v) for v in stats.values())
    loss.sum().backward()
    for leaf, mask in zip(leaves, (x.chosen_mask, x.rejected_mask), strict=True):
        grad = leaf.grad
        assert grad is not None
        assert grad[mask == 0].abs().sum() == 0, "gradient leaked to padding"
        assert grad[mask != 0].abs().sum() > 0
