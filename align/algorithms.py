"""Algorithms as named compositions: advantage x credit x policy loss (ratio level, clip) x reducer x KL.

An :class:`AlgorithmSpec` is checked when it is built: unknown names, unknown hyperparameters and incoherent
combinations are refused with one line that gives the reason and the nearest valid alternative. (TRL only warns
about such combinations; other frameworks silently override them.) Presets follow spec §9's table:

    name         advantage   ratio (loss)       clip            reducer                     KL
    grpo         grpo        token (ppo_clip)   (0.2, 0.2)      seq_mean_token_mean         k3 in loss, 0.04
    dr_grpo      dr_grpo     token (ppo_clip)   (0.2, 0.2)      seq_mean_token_sum_norm     none
    dapo         grpo        token (ppo_clip)   (0.2, 0.28)     token_mean + drop uniform   none
    gspo         grpo        sequence (gspo)    (3e-4, 4e-4)    seq_mean_token_mean         none
    gspo_token   grpo        seq-token          (3e-4, 4e-4)    seq_mean_token_mean         none
    gtpo         dr_grpo     token, no clip     none            seq_mean_token_mean         none
    rloo         rloo        token (ppo_clip)   (0.2, 0.2)      seq_mean_token_sum          k1 in reward, 0.03
    reinforce_pp reinforce_pp token (ppo_clip)  (0.2, 0.2)      token_mean                  k1 in reward, 0.01
    ppo          gae+critic  token (ppo_clip)   (0.2, 0.2)      token_mean (+ value loss)   k1 in reward, 0.01
    rto          gae+critic  token (ppo_clip)   (0.2, 0.2)      token_mean (+ value loss)   k1 in reward, 0.01
                 (rto: PPO on implicit_dpo token rewards, arXiv 2404.18922; the recipe names the DPO model)

and the preference presets dpo, ipo, simpo, tdpo (TDPO2), cdpo, tgdpo, treg, aligndistil.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from align.advantages import ADVANTAGES, CRITIC_RETURNS
from align.errors import IncompatibleSpecError, UnknownNameError
from align.losses import KL_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES, REDUCERS, VALUE_LOSSES
from align.registry import Registry

CREDIT_LEVELS: Registry[str] = Registry("credit module")
"""What each credit-assignment module produces, keyed by its name:

* ``"sequence"``: token rewards that carry no information beyond the sequence reward (``uniform``, ``last_token``);
  summing them back to a scalar loses nothing;
* ``"token_rewards"``: token rewards that differ inside a sequence; they need a token-level advantage estimator;
* ``"token_weights"``: multiplicative weights applied to the advantages after the estimator.

Credit modules live above the core (``rewards.credit``) and register here when imported, so the compatibility check
can reason about them without importing upward.
"""
CREDIT_KINDS = ("sequence", "token_rewards", "token_weights")

Kind = Literal["policy", "preference"]
KLPlacement = Literal["loss", "reward"]


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class AlgorithmSpec:
    """A named composition of registered parts; validated on construction (also by ``dataclasses.replace``)."""

    name: str = "custom"
    kind: Kind = "policy"
    # policy-gradient parts
    advantage: str | None = None
    advantage_kwargs: Mapping[str, Any] = field(default_factory=dict)
    credit: str | None = None  # None: the sequence reward goes to the estimator as is
    policy_loss: str | None = None
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict)
    reducer: str | None = None
    generation_budget: int | None = None  # L_norm of seq_mean_token_sum_norm; None = padded length of the step
    kl: str | None = None
    kl_coef: float = 0.0
    kl_placement: KLPlacement = "loss"
    drop_uniform_groups: bool = False  # DAPO dynamic sampling
    # critic (PPO, RTO): a value head on the policy's last hidden state, trained with it (total loss = policy loss +
    # vf_coef * value loss), whose values V(s_t) an estimator of CRITIC_RETURNS (gae) reads
    value_loss: str | None = None
    value_kwargs: Mapping[str, Any] = field(default_factory=dict)
    vf_coef: float = 0.0
    # preference parts
    preference_loss: str | None = None
    preference_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # resources
    has_reference: bool = True  # a frozen reference model is available

    def __post_init__(self) -> None:
        for name in ("advantage_kwargs", "loss_kwargs", "preference_kwargs", "value_kwargs"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        check_spec(self)

    def with_options(self, **changes: Any) -> AlgorithmSpec:
        """A validated copy with some fields changed; ``*_kwargs`` given here are merged, not replaced."""
        for name in ("advantage_kwargs", "loss_kwargs", "preference_kwargs", "value_kwargs"):
            if name in changes:
                changes[name] = {**getattr(self, name), **changes[name]}
        return replace(self, **changes)


def _refuse(spec: AlgorithmSpec, reason: str, alternative: str) -> IncompatibleSpecError:
    return IncompatibleSpecError(f"algorithm {spec.name!r}: {reason}; {alternative}")


def _check_kwargs(spec: AlgorithmSpec, what: str, fn: Callable[..., Any], kwargs: Mapping[str, Any], skip: int) -> None:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    valid = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        listing = ", ".join(valid) if valid else "(none)"
        raise _refuse(spec, f"{what} has no option {', '.join(map(repr, unknown))}", f"valid options: {listing}")


def _lookup(registry: Registry[Any], name: str) -> Any:
    try:
        return registry.get(name)
    except UnknownNameError as err:
        raise IncompatibleSpecError(str(err)) from None


def check_spec(spec: AlgorithmSpec) -> None:
    """Raise :class:`IncompatibleSpecError` with a one-line reason and fix if ``spec`` is incoherent."""
    if spec.kind == "preference":
        _check_preference(spec)
    elif spec.kind == "policy":
        _check_policy(spec)
    else:
        raise _refuse(spec, f"kind must be 'policy' or 'preference', got {spec.kind!r}", "pick one of the two")


def _check_preference(spec: AlgorithmSpec) -> None:
    stray = [f for f in ("advantage", "policy_loss", "reducer", "kl", "value_loss") if getattr(spec, f) is not None]
    if stray:
        raise _refuse(spec, f"a preference algorithm takes no {', '.join(stray)}",
                      "remove them, or use kind='policy' for on-policy RL")
    if spec.preference_loss is None:
        raise _refuse(spec, "a preference algorithm needs preference_loss",
                      f"choose one of {', '.join(PREFERENCE_LOSSES.names())}")
    fn = _lookup(PREFERENCE_LOSSES, spec.preference_loss)
    _check_kwargs(spec, f"preference loss {spec.preference_loss!r}", fn, spec.preference_kwargs, skip=1)
    if spec.credit is not None:
        wanted = {"cdpo": "token_weights", "tgdpo": "token_rewards", "treg": "token_rewards",
                  "aligndistil": "token_rewards"}.get(spec.preference_loss)
        level = _lookup(CREDIT_LEVELS, spec.credit)
        if wanted is None or level != wanted:
            raise _refuse(spec, f"credit {spec.credit!r} ({level}) has no role in preference loss "
                          f"{spec.preference_loss!r}", "cdpo takes token weights (contrastive_critical), tgdpo token "
                          "rewards (implicit_dpo), treg contrastive_prompting, aligndistil contrastive_dpo; other "
                          "preference losses take no credit")
    if PREFERENCE_LOSSES.info(spec.preference_loss).get("reference") and not spec.has_reference:
        raise _refuse(spec, f"{spec.preference_loss} compares against a reference model but has_reference=False",
                      "use preference_loss='simpo' (reference-free) or provide a reference model")


def _check_policy(spec: AlgorithmSpec) -> None:
    if spec.preference_loss is not None:
        raise _refuse(spec, "a policy algorithm takes no preference_loss", "use kind='preference' for DPO-style losses")
    for part, registry in (("advantage", ADVANTAGES), ("policy_loss", POLICY_LOSSES), ("reducer", REDUCERS)):
        if getattr(spec, part) is None:
            raise _refuse(spec, f"a policy algorithm needs {part}", f"choose one of {', '.join(registry.names())}")
    assert spec.advantage is not None and spec.policy_loss is not None and spec.reducer is not None
    _check_kwargs(spec, f"advantage {spec.advantage!r}", _lookup(ADVANTAGES, spec.advantage),
                  spec.advantage_kwargs, skip=3)
    _check_kwargs(spec, f"policy loss {spec.policy_loss!r}", _lookup(POLICY_LOSSES, spec.policy_loss),
                  spec.loss_kwargs, skip=1)
    _lookup(REDUCERS, spec.reducer)
    _check_kl(spec)
    _check_granularity(spec)
    _check_critic(spec)
    budget = spec.generation_budget
    if budget is not None and (spec.reducer != "seq_mean_token_sum_norm" or budget <= 0):
        raise _refuse(spec, f"generation_budget={budget} is only used by reducer 'seq_mean_token_sum_norm' "
                      "and must be a positive token count", "remove it or switch to that reducer")


def _check_kl(spec: AlgorithmSpec) -> None:
    if spec.kl_placement not in ("loss", "reward"):
        raise _refuse(spec, f"kl_placement must be 'loss' or 'reward', got {spec.kl_placement!r}", "pick one")
    if spec.kl is None:
        if spec.kl_coef != 0.0:
            raise _refuse(spec, f"kl_coef={spec.kl_coef} but no KL estimator is set",
                          f"set kl to one of {', '.join(KL_ESTIMATORS.names())} or kl_coef=0")
        return
    _lookup(KL_ESTIMATORS, spec.kl)
    if not spec.has_reference:
        raise _refuse(spec, f"KL estimator {spec.kl!r} needs a reference model but has_reference=False",
                      "set kl=None (as DAPO, GSPO, Dr. GRPO) or provide a reference model")
    if spec.kl_coef <= 0.0:
        raise _refuse(spec, f"KL estimator {spec.kl!r} with kl_coef={spec.kl_coef} costs a reference forward pass "
                      "for nothing", "set kl_coef > 0 (GRPO uses 0.04) or kl=None")


def _check_critic(spec: AlgorithmSpec) -> None:
    reads_values = spec.advantage in CRITIC_RETURNS
    if spec.value_loss is None:
        if reads_values:
            raise _refuse(spec, f"advantage {spec.advantage!r} reads critic values V(s_t) but the algorithm trains no "
                          "critic", "set value_loss='clipped_mse' and vf_coef > 0 (as the ppo preset), or use a "
                          "critic-free estimator (reinforce_pp, dense_group)")
        if spec.vf_coef != 0.0 or spec.value_kwargs:
            raise _refuse(spec, f"vf_coef={spec.vf_coef} and value_kwargs={dict(spec.value_kwargs)} need a value "
                          "loss", f"set value_loss to one of {', '.join(VALUE_LOSSES.names())}, or remove them")
        return
    if not reads_values:
        raise _refuse(spec, f"value loss {spec.value_loss!r} trains a critic that advantage {spec.advantage!r} never "
                      "reads", f"use advantage={' or '.join(map(repr, CRITIC_RETURNS))}, or value_loss=None")
    _check_kwargs(spec, f"value loss {spec.value_loss!r}", _lookup(VALUE_LOSSES, spec.value_loss), spec.value_kwargs,
                  skip=4)
    if not spec.vf_coef > 0.0:
        raise _refuse(spec, f"vf_coef={spec.vf_coef} leaves the critic untrained", "set vf_coef > 0 (the ppo preset "
                      "uses 0.1, as TRL) or value_loss=None")


def _check_granularity(spec: AlgorithmSpec) -> None:
    assert spec.advantage is not None and spec.policy_loss is not None
    # entries registered without metadata are assumed to vary per token (the cautious reading)
    advantage_level = ADVANTAGES.info(spec.advantage).get("granularity", "token")
    credit_level = None
    if spec.credit is not None:
        credit_level = _lookup(CREDIT_LEVELS, spec.credit)
    ratio = POLICY_LOSSES.info(spec.policy_loss).get("ratio", "token")
    if credit_level not in (None, *CREDIT_KINDS):
        raise _refuse(spec, f"credit module {spec.credit!r} registered an unknown kind {credit_level!r}",
                      f"register it as one of {', '.join(CREDIT_KINDS)}")
    if credit_level == "token_rewards" and advantage_level == "sequence":
        raise _refuse(spec, f"credit {spec.credit!r} gives per-token rewards but advantage {spec.advantage!r} sums "
                      "them back into one scalar per sequence", "use advantage='dense_group' (group baseline that "
                      "keeps token rewards), 'reinforce_pp' or 'gae'")
    if (spec.credit is not None and CREDIT_LEVELS.info(spec.credit).get("owns_scale")
            and spec.advantage == "dense_group" and spec.advantage_kwargs.get("scale_by_std", True)):
        # e.g. prm_steps(normalize=True) is GRPO-PRM's normaliser (arXiv 2402.03300 §4.1.3): dividing its reward-to-go
        # by the std of the group's returns again shrinks A (step scores [[1, 1], [0]]: 1.1547 -> 0.7071)
        raise _refuse(spec, f"credit {spec.credit!r} sets the scale of its token rewards itself (its group "
                      "normalisation) but advantage 'dense_group' would divide them by the group std a second time",
                      "set advantage_kwargs={'scale_by_std': False}")
    token_credit = credit_level in ("token_rewards", "token_weights")
    token_level = advantage_level == "token" or token_credit
    if ratio == "sequence":
        if token_level:
            source = f"credit {spec.credit!r}" if token_credit else f"advantage {spec.advantage!r}"
            raise _refuse(spec, f"policy loss 'gspo' uses one ratio and one advantage per sequence but {source} "
                          "varies per token", "use policy_loss='gspo_token' (sequence trust region, token credit)")
        if spec.reducer != "seq_mean_token_mean":
            raise _refuse(spec, f"GSPO's objective has one term per sequence (arXiv 2507.18071 eq. 5) but reducer "
                          f"{spec.reducer!r} would weight each sequence by its length",
                          "use reducer='seq_mean_token_mean', or policy_loss='gspo_token' for token aggregation")
    if spec.policy_loss == "gtpo" and token_level:
        raise _refuse(spec, "gtpo shifts one advantage per sequence by its entropy but the advantage varies per "
                      "token", "use advantage='dr_grpo' (GTPO's A = r - mean r) or 'grpo'")


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------
PRESETS: Registry[AlgorithmSpec] = Registry("algorithm preset")

GRPO = PRESETS.register("grpo", AlgorithmSpec(
    name="grpo", advantage="grpo", policy_loss="ppo_clip", loss_kwargs={"eps_low": 0.2},
    reducer="seq_mean_token_mean", kl="k3", kl_coef=0.04,
))
DR_GRPO = PRESETS.register("dr_grpo", replace(GRPO, name="dr_grpo", advantage="dr_grpo",
                                              reducer="seq_mean_token_sum_norm", kl=None, kl_coef=0.0))
DAPO = PRESETS.register("dapo", replace(GRPO, name="dapo", reducer="token_mean", kl=None, kl_coef=0.0,
                                        loss_kwargs={"eps_low": 0.2, "eps_high": 0.28}, drop_uniform_groups=True))
GSPO = PRESETS.register("gspo", replace(GRPO, name="gspo", policy_loss="gspo", kl=None, kl_coef=0.0,
                                        loss_kwargs={"eps_low": 3e-4, "eps_high": 4e-4}))
GSPO_TOKEN = PRESETS.register("gspo_token", replace(GSPO, name="gspo_token", policy_loss="gspo_token"))
# GTPO (arXiv 2508.03772): completions averaged (gtpo's sum_over_group=False: lr independent of G; the official code
# sums them, G times larger), entropy of the raw logits as the official code (the trainer's default)
GTPO = PRESETS.register("gtpo", replace(GRPO, name="gtpo", advantage="dr_grpo", policy_loss="gtpo", loss_kwargs={},
                                        kl=None, kl_coef=0.0))
RLOO = PRESETS.register("rloo", replace(GRPO, name="rloo", advantage="rloo", reducer="seq_mean_token_sum",
                                        kl="k1", kl_coef=0.03, kl_placement="reward"))
REINFORCE_PP = PRESETS.register("reinforce_pp", replace(GRPO, name="reinforce_pp", advantage="reinforce_pp",
                                                        reducer="token_mean", kl="k1", kl_coef=0.01,
                                                        kl_placement="reward"))
# PPO with a learned critic (Schulman et al. 2017, arXiv 1707.06347; GAE arXiv 1506.02438 eq. 16), as RLHF runs it
# (Ouyang et al. 2022; OpenRLHF, TRL, verl): token ratio clipped at 0.2; advantages by GAE with gamma = 1,
# lambda = 0.95 (OpenRLHF `--gamma 1 --lambd 0.95`, TRL PPOConfig `gamma=1.0, lam=0.95`), whitened over the batch;
# k1 KL in the reward at 0.01 (OpenRLHF `--init_kl_coef 0.01`); the critic's loss is baselines' clipped squared
# error at 0.2 (OpenRLHF `--value_clip 0.2`, TRL `cliprange_value=0.2`) with vf_coef 0.1 (TRL PPOConfig, whose loss
# also sums policy and value terms; OpenAI baselines' ppo2 uses 0.5 on Atari trunks; on the tiny arithmetic task
# 0.1 and 0.5 ended 60 steps within 1.4 points of held-out accuracy, seed 0). With Adam the coefficient only sets
# the value gradient's weight in the shared trunk; the head's speed is learner.value_lr's.
PPO = PRESETS.register("ppo", AlgorithmSpec(
    name="ppo", advantage="gae", advantage_kwargs={"gamma": 1.0, "lam": 0.95}, policy_loss="ppo_clip",
    loss_kwargs={"eps_low": 0.2}, reducer="token_mean", kl="k1", kl_coef=0.01, kl_placement="reward",
    value_loss="clipped_mse", value_kwargs={"clip": 0.2}, vf_coef=0.1,
))
# RTO (Zhong et al., arXiv 2404.18922; spec §7): PPO on the token reward clip_c(beta1 (lp_dpo - lp_sft))
# - beta2 (lp_old - lp_sft) + 1[t = last] r_RM. The first and last terms are credit module implicit_dpo (beta1 =
# 0.05, c = 0.05 by default: the reward side fills them in and requires the recipe to name the DPO model), the middle
# one this spec's k1 KL in the reward with beta2 = 0.01 (the authors' `init_kl_coef`); gamma 1, lambda 0.95.
RTO = PRESETS.register("rto", replace(PPO, name="rto"))

DPO = PRESETS.register("dpo", AlgorithmSpec(name="dpo", kind="preference", preference_loss="dpo"))
IPO = PRESETS.register("ipo", replace(DPO, name="ipo", preference_loss="ipo"))
SIMPO = PRESETS.register("simpo", replace(DPO, name="simpo", preference_loss="simpo", has_reference=False))
TDPO = PRESETS.register("tdpo", replace(DPO, name="tdpo", preference_loss="tdpo2"))
CDPO = PRESETS.register("cdpo", replace(DPO, name="cdpo", preference_loss="cdpo"))
TGDPO = PRESETS.register("tgdpo", replace(DPO, name="tgdpo", preference_loss="tgdpo"))
TREG = PRESETS.register("treg", replace(DPO, name="treg", preference_loss="treg"))
# the teacher replaces the reference (a DPO and a reverse-DPO model, loaded by the rewards side): no reference pass
ALIGNDISTIL = PRESETS.register("aligndistil", replace(DPO, name="aligndistil", preference_loss="aligndistil",
                                                      has_reference=False))


def resolve(spec: str | AlgorithmSpec) -> AlgorithmSpec:
    """A preset name or an :class:`AlgorithmSpec` -> the spec (unknown names list the presets)."""
    return spec if isinstance(spec, AlgorithmSpec) else PRESETS.get(spec)
