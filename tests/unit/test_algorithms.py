"""AlgorithmSpec: every preset is coherent, and incoherent compositions are refused with a reason and a fix."""

from __future__ import annotations

from dataclasses import replace

import pytest

from align.algorithms import CREDIT_LEVELS, GRPO, GSPO, GTPO, PRESETS, SIMPO, AlgorithmSpec, resolve
from align.errors import IncompatibleSpecError, UnknownNameError

REQUIRED_PRESETS = {"grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "gtpo", "rloo", "reinforce_pp", "ppo", "rto",
                    "dpo", "ipo", "simpo", "tdpo", "cdpo", "tgdpo"}

# Credit modules register their granularity from above the core; the tests register two stand-ins.
CREDIT_LEVELS.register("test_token_credit", "token_rewards")
CREDIT_LEVELS.register("test_weight_credit", "token_weights")
CREDIT_LEVELS.register("test_sequence_credit", "sequence")
CREDIT_LEVELS.register("test_odd_credit", "per_character")


def test_every_required_preset_exists_and_is_valid() -> None:
    assert set(PRESETS.names()) >= REQUIRED_PRESETS
    for name in PRESETS.names():
        spec = PRESETS.get(name)
        assert spec.name == name
        replace(spec)  # re-validates


def test_resolve_accepts_names_and_specs() -> None:
    assert resolve("grpo") is GRPO
    assert resolve(GSPO) is GSPO
    with pytest.raises(UnknownNameError, match="did you mean 'grpo'"):
        resolve("grpoo")


def test_dapo_is_a_variant_of_grpo() -> None:
    dapo = PRESETS.get("dapo")
    assert (dapo.advantage, dapo.policy_loss) == (GRPO.advantage, GRPO.policy_loss)
    assert dapo.reducer == "token_mean" and dapo.kl is None and dapo.drop_uniform_groups
    assert dict(dapo.loss_kwargs) == {"eps_low": 0.2, "eps_high": 0.28}


REFUSALS = [
    (lambda: replace(GSPO, advantage="gae"), "varies per token", "gspo_token"),
    (lambda: replace(GSPO, credit="test_token_credit", advantage="dense_group"), "varies per token", "gspo_token"),
    (lambda: replace(GSPO, reducer="token_mean"), "weight each sequence by its length", "seq_mean_token_mean"),
    (lambda: replace(GRPO, credit="test_token_credit"), "sums them back", "dense_group"),
    (lambda: replace(GSPO, credit="test_weight_credit"), "varies per token", "gspo_token"),
    (lambda: replace(GTPO, credit="test_weight_credit"), "varies per token", "dr_grpo"),
    (lambda: replace(GRPO, credit="test_odd_credit"), "unknown kind 'per_character'", "token_weights"),
    (lambda: replace(GTPO, advantage="reinforce_pp"), "varies per token", "dr_grpo"),
    (lambda: replace(GRPO, has_reference=False), "needs a reference model", "kl=None"),
    (lambda: replace(GRPO, kl_coef=0.0), "for nothing", "kl_coef > 0"),
    (lambda: replace(GRPO, kl=None), "no KL estimator is set", "kl_coef=0"),
    (lambda: replace(GRPO, kl="k9"), "unknown KL estimator 'k9'", "known: k1, k2, k3, k3_plus"),
    (lambda: replace(GRPO, kl_placement="both"), "kl_placement must be", "pick one"),
    (lambda: replace(GRPO, loss_kwargs={"epsilon": 0.2}), "no option 'epsilon'", "eps_low, eps_high, dual_clip"),
    (lambda: replace(GRPO, advantage_kwargs={"std": False}), "no option 'std'", "scale_by_std"),
    (lambda: replace(GRPO, generation_budget=4096), "only used by reducer", "seq_mean_token_sum_norm"),
    (lambda: replace(GRPO, policy_loss=None), "needs policy_loss", "ppo_clip"),
    (lambda: replace(GRPO, preference_loss="dpo"), "takes no preference_loss", "kind='preference'"),
    (lambda: replace(PRESETS.get("dpo"), has_reference=False), "has_reference=False", "simpo"),
    (lambda: replace(PRESETS.get("dpo"), advantage="grpo"), "takes no advantage", "kind='policy'"),
    (lambda: replace(PRESETS.get("dpo"), credit="test_token_credit"), "has no role", "cdpo takes token weights"),
    (lambda: replace(PRESETS.get("dpo"), preference_kwargs={"gamma": 1.0}), "no option 'gamma'", "label_smoothing"),
    (lambda: replace(GRPO, credit="no_such_credit"), "unknown credit module", "test_token_credit"),
    (lambda: AlgorithmSpec(kind="offline"), "kind must be", "pick one"),
]


@pytest.mark.parametrize(("build", "reason", "fix"), REFUSALS)
def test_incoherent_compositions_are_refused_in_one_line(build, reason: str, fix: str) -> None:
    with pytest.raises(IncompatibleSpecError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message
    assert reason in message
    assert fix in message


def test_coherent_token_level_compositions_are_accepted() -> None:
    token_credit_gspo = replace(GSPO, name="gspo_token_credit", policy_loss="gspo_token", credit="test_token_credit",
                                advantage="dense_group")
    assert token_credit_gspo.credit == "test_token_credit"
    assert replace(GRPO, credit="test_sequence_credit").credit == "test_sequence_credit"
    assert replace(GRPO, credit="test_weight_credit").credit == "test_weight_credit"  # weights act after GRPO
    # token advantages with a token ratio (gae reads a critic, so it comes with one)
    assert replace(GRPO, advantage="gae", value_loss="clipped_mse", vf_coef=0.5).advantage == "gae"
    assert SIMPO.has_reference is False


def test_with_options_merges_kwargs() -> None:
    spec = PRESETS.get("dapo").with_options(loss_kwargs={"dual_clip": 3.0})
    assert dict(spec.loss_kwargs) == {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0}
    with pytest.raises(TypeError):
        spec.loss_kwargs["eps_low"] = 0.1  # type: ignore[index]
