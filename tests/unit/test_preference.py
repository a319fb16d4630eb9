"""Preference losses: hand-computed values, TDPO against a naive full-vocabulary reference, and reductions to DPO."""

from __future__ import annotations

import math

import pytest
import torch

from align import functional as F
from align.errors import InputError, UnknownNameError


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def pair_batch(seed: int = 0, tc: int = 4, tr: int = 3, vocab: int = 9) -> dict:
    gen = torch.Generator().manual_seed(seed)
    b = 3
    chosen_mask = torch.ones(b, tc, dtype=torch.float64)
    chosen_mask[1, 3:] = 0
    rejected_mask = torch.ones(b, tr, dtype=torch.float64)
    rejected_mask[2, 1:] = 0
    logits = {k: torch.randn(b, t, vocab, generator=gen, dtype=torch.float64)
              for k, t in (("chosen", tc), ("rejected", tr), ("ref_chosen", tc), ("ref_rejected", tr))}
    ids = {"chosen": torch.randint(0, vocab, (b, tc), generator=gen),
           "rejected": torch.randint(0, vocab, (b, tr), generator=gen)}
    logp = {k: torch.log_softmax(v, -1).gather(-1, ids[k.removeprefix("ref_")].unsqueeze(-1)).squeeze(-1)
            for k, v in logits.items()}
    return {"logits": logits, "logp": logp, "chosen_mask": chosen_mask, "rejected_mask": rejected_mask}


def core_kwargs(p: dict) -> dict:
    return {"chosen_logp": p["logp"]["chosen"], "rejected_logp": p["logp"]["rejected"],
            "ref_chosen_logp": p["logp"]["ref_chosen"], "ref_rejected_logp": p["logp"]["ref_rejected"],
            "chosen_mask": p["chosen_mask"], "rejected_mask": p["rejected_mask"]}


def single_pair(chosen: list[float], rejected: list[float], ref_chosen: list[float], ref_rejected: list[float]):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return {"chosen_logp": t(chosen), "rejected_logp": t(rejected), "ref_chosen_logp": t(ref_chosen),
            "ref_rejected_logp": t(ref_rejected), "chosen_mask": torch.ones(1, len(chosen)),
            "rejected_mask": torch.ones(1, len(rejected))}


HAND = single_pair([-1.0, -0.5], [-2.0, -1.0, -0.5], [-1.2, -0.7], [-1.5, -1.0, -0.4])
H_W, H_L = 0.4, -0.6  # summed log-ratios of HAND


def test_dpo_hand_value_and_label_smoothing() -> None:
    loss, metrics = F.preference_loss("dpo", **HAND, beta=0.1)
    assert loss.item() == pytest.approx(softplus(-0.1 * (H_W - H_L)), abs=1e-12)
    assert metrics["rewards/margin"] == pytest.approx(0.1, abs=1e-12)
    assert metrics["rewards/accuracy"] == 1.0
    smooth, _ = F.preference_loss("dpo", **HAND, beta=0.1, label_smoothing=0.2)
    assert smooth.item() == pytest.approx(0.8 * softplus(-0.1) + 0.2 * softplus(0.1), abs=1e-12)


def test_ipo_hand_value() -> None:
    loss, _ = F.preference_loss("ipo", **HAND, beta=0.5)
    delta = H_W / 2 - H_L / 3
    assert loss.item() == pytest.approx((delta - 1.0) ** 2, abs=1e-12)


def test_simpo_hand_value_and_no_reference() -> None:
    kw = {**HAND, "ref_chosen_logp": None, "ref_rejected_logp": None}
    loss, _ = F.preference_loss("simpo", **kw, beta=2.0, gamma=0.5)
    margin = 2.0 * (-1.5 / 2) - 2.0 * (-3.5 / 3) - 0.5
    assert loss.item() == pytest.approx(softplus(-margin), abs=1e-12)
    with pytest.raises(InputError, match="use simpo"):
        F.preference_loss("dpo", **kw)


def naive_seq_kl(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ref = torch.log_softmax(ref_logits, -1)
    kl = (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1)
    return (kl * mask).sum(-1)


@pytest.mark.parametrize(("name", "alpha"), [("tdpo1", 1.0), ("tdpo2", 0.5)])
def test_tdpo_matches_naive_full_vocabulary_formula(name: str, alpha: float) -> None:
    p = pair_batch(1)
    logits = {k: v.clone().requires_grad_(True) for k, v in p["logits"].items() if not k.startswith("ref")}
    loss, metrics = F.preference_loss(
        name, **core_kwargs(p), chosen_logits=logits["chosen"], rejected_logits=logits["rejected"],
        ref_chosen_logits=p["logits"]["ref_chosen"], ref_rejected_logits=p["logits"]["ref_rejected"],
    )
    kl_w = naive_seq_kl(p["logits"]["ref_chosen"], p["logits"]["chosen"], p["chosen_mask"])
    kl_l = naive_seq_kl(p["logits"]["ref_rejected"], p["logits"]["rejected"], p["rejected_mask"])
    h_w = ((p["logp"]["chosen"] - p["logp"]["ref_chosen"]) * p["chosen_mask"]).sum(-1)
    h_l = ((p["logp"]["rejected"] - p["logp"]["ref_rejected"]) * p["rejected_mask"]).sum(-1)
    expected = torch.nn.functional.softplus(-0.1 * (h_w - h_l - alpha * (kl_l - kl_w))).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert metrics["seq_kl/chosen"] == pytest.approx(kl_w.mean().item(), abs=1e-12)
    loss.backward()
    assert logits["rejected"].grad.abs().sum() > 0
    chosen_grad = logits["chosen"].grad
    chosen_kl_has_gradient = chosen_grad is not None and bool(chosen_grad.abs().sum() > 0)
    assert chosen_kl_has_gradient == (name == "tdpo1")  # TDPO2 stops the chosen SeqKL gradient


def test_tdpo_preset_is_tdpo2_and_needs_logits() -> None:
    p = pair_batch(2)
    with pytest.raises(InputError, match="tdpo needs full-vocabulary logits"):
        F.preference_loss("tdpo", **core_kwargs(p))
    kw = {"chosen_logits": p["logits"]["chosen"], "rejected_logits": p["logits"]["rejected"],
          "ref_chosen_logits": p["logits"]["ref_chosen"], "ref_rejected_logits": p["logits"]["ref_rejected"]}
    preset, _ = F.preference_loss("tdpo", **core_kwargs(p), **kw)
    direct, _ = F.preference_loss("tdpo2", **core_kwargs(p), **kw)
    assert preset.item() == direct.item()


@pytest.mark.parametrize("name", ["cdpo", "tgdpo"])
def test_unit_token_weights_reduce_to_dpo(name: str) -> None:
    p = pair_batch(3)
    dpo, _ = F.preference_loss("dpo", **core_kwargs(p))
    extra = ({"chosen_weights": torch.ones_like(p["chosen_mask"]), "rejected_weights": torch.ones_like(
        p["rejected_mask"])} if name == "cdpo" else {})
    weighted, _ = F.preference_loss(name, **core_kwargs(p), **extra)
    assert weighted.item() == pytest.approx(dpo.item(), abs=1e-12)


def test_cdpo_paper_form_and_per_position_form() -> None:
    kw = single_pair([-1.0, -0.5], [-2.0, -1.0, -0.5], [-1.2, -0.7], [-1.5, -1.0, -0.4])
    w_l = torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64)
    loss, _ = F.preference_loss("cdpo", **kw, rejected_weights=w_l, beta=1.0)
    weighted_l = 0.5 * -0.5 + 1.0 * 0.0 + 0.0 * -0.1
    assert loss.item() == pytest.approx(softplus(-(0.4 - weighted_l)), abs=1e-12)
    per_pos, _ = F.preference_loss("cdpo", **kw, rejected_weights=w_l, beta=1.0, per_position=True)
    terms = [0.2 - 0.5 * -0.5, 0.2 - 0.0, 0.0 - 0.0]  # position 2 exists only in the rejected response
    assert per_pos.item() == pytest.approx(sum(softplus(-z) for z in terms) / 3, abs=1e-12)


def test_tgdpo_hand_value_and_weight_report() -> None:
    kw = single_pair([-1.0, -0.5], [-2.0, -1.0, -0.5], [-1.2, -0.7], [-1.5, -1.0, -0.4])
    r_w = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    r_l = torch.tensor([[0.5, 0.0, 4.0]], dtype=torch.float64)
    loss, metrics = F.preference_loss("tgdpo", **kw, beta=1.0, alpha=0.5, chosen_token_rewards=r_w,
                                      rejected_token_rewards=r_l)
    h_w = 1.5 * 0.2 + 0.5 * 0.2
    h_l = 0.75 * -0.5 + 1.0 * 0.0 + (1 - 2.0) * -0.1
    assert loss.item() == pytest.approx(softplus(-(h_w - h_l)), abs=1e-12)
    assert metrics["nonpositive_weight_frac"] == pytest.approx(1 / 5)


def test_gradients_flow_only_through_policy_log_probs_on_the_mask() -> None:
    p = pair_batch(4)
    kw = core_kwargs(p)
    chosen = kw["chosen_logp"].clone().requires_grad_(True)
    ref = kw["ref_chosen_logp"].clone().requires_grad_(True)
    loss, _ = F.preference_loss("dpo", **{**kw, "chosen_logp": chosen, "ref_chosen_logp": ref})
    loss.backward()
    assert ref.grad is None or ref.grad.abs().sum() == 0
    assert chosen.grad[p["chosen_mask"] == 0].abs().sum() == 0
    assert chosen.grad[p["chosen_mask"] == 1].abs().min() > 0


def test_errors_are_clear() -> None:
    p = pair_batch(5)
    with pytest.raises(UnknownNameError, match=r"did you mean 'dpo'.* known: .*cdpo, dpo"):
        F.preference_loss("dpoo", **core_kwargs(p))
    bad = core_kwargs(p)
    bad["chosen_logp"] = bad["chosen_logp"].clone()
    bad["chosen_logp"][0, 0] = float("nan")
    with pytest.raises(InputError, match="chosen_logp holds 1 non-finite"):
        F.preference_loss("dpo", **bad)
    with pytest.raises(InputError, match="must match its log-probs"):
        F.preference_loss("cdpo", **core_kwargs(p), rejected_weights=torch.ones(3, 7))
