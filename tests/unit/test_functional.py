"""The functional facade: exact signatures, loud errors on bad input, and edge cases that must not yield NaN."""

from __future__ import annotations

import inspect

import pytest
import torch

from align import functional as F
from align.errors import InputError

from ..conftest import random_batch


def test_facade_signatures_are_exactly_as_documented() -> None:
    assert str(inspect.signature(F.advantages)) == "(name: 'str', *, rewards: 'Tensor', mask: 'Tensor', group_ids: " \
        "'Tensor', **kw: 'Any') -> 'Tensor'"
    assert str(inspect.signature(F.policy_objective)) == (
        "(spec: 'str | AlgorithmSpec', *, logp: 'Tensor', old_logp: 'Tensor', advantages: 'Tensor', mask: 'Tensor', "
        "ref_logp: 'Tensor | None' = None, entropy: 'Tensor | None' = None, token_ids: 'Tensor | None' = None, "
        "group_ids: 'Tensor | None' = None) -> 'tuple[Tensor, dict[str, float]]'"
    )
    params = inspect.signature(F.preference_loss).parameters
    assert list(params) == ["name", "chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp",
                            "chosen_mask", "rejected_mask", "kw"]
    assert all(p.kind is p.KEYWORD_ONLY for n, p in params.items() if n not in ("name", "kw"))


def grpo_call(**overrides):
    b = random_batch(41)
    kw = {"logp": b["logp"].clone().requires_grad_(True), "old_logp": b["old_logp"],
          "advantages": F.advantages("grpo", rewards=b["rewards"], mask=b["mask"], group_ids=b["group_ids"]),
          "mask": b["mask"], "ref_logp": b["ref_logp"]}
    kw.update(overrides)
    return F.policy_objective("grpo", **kw)


@pytest.mark.parametrize("field", ["logp", "old_logp", "advantages", "ref_logp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_on_the_mask_is_a_clear_error(field: str, bad: float) -> None:
    b = random_batch(41)
    tensor = {"logp": b["logp"], "old_logp": b["old_logp"], "ref_logp": b["ref_logp"],
              "advantages": torch.zeros_like(b["logp"])}[field].clone()
    tensor[0, 0] = bad  # row 0 position 0 is trainable in this batch
    assert b["mask"][0, 0] == 1
    with pytest.raises(InputError, match=f"^{field} holds 1 non-finite value"):
        grpo_call(**{field: tensor})


def test_non_finite_padding_is_ignored() -> None:
    b = random_batch(41)
    logp = b["logp"].clone()
    logp[b["mask"] == 0] = float("-inf")
    loss, metrics = grpo_call(logp=logp.requires_grad_(True))
    assert torch.isfinite(loss)
    assert all(v == v for v in metrics.values())


def test_fully_masked_batch_gives_zero_loss_and_zero_gradient() -> None:
    b = random_batch(42)
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = grpo_call(logp=logp, mask=torch.zeros_like(b["mask"]), advantages=torch.zeros_like(b["logp"]))
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() == 0


def test_shape_mismatch_is_a_clear_error() -> None:
    b = random_batch(43)
    with pytest.raises(InputError, match=r"old_logp has shape \(12, 6\) but logp has \(12, 7\)"):
        grpo_call(old_logp=b["old_logp"][:, :6])
    with pytest.raises(InputError, match="mask must hold only 0 and 1"):
        grpo_call(mask=b["mask"] * 0.5)


def test_preference_preset_refused_by_policy_objective() -> None:
    b = random_batch(44)
    with pytest.raises(InputError, match="preference algorithm"):
        F.policy_objective("dpo", logp=b["logp"], old_logp=b["logp"], advantages=b["logp"], mask=b["mask"])
