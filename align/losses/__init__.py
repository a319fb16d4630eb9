"""Losses and their registries: policy losses, reducers, KL estimators, preference losses, value losses and rollout
corrections (the engine-vs-learner importance weights)."""

from align.losses.kl import KL_ESTIMATORS, kl_reward_penalty
from align.losses.policy import POLICY_LOSSES, PolicyInputs
from align.losses.preference import PREFERENCE_LOSSES, PreferenceInputs
from align.losses.preference_token import aligndistil_teacher  # registers treg and aligndistil
from align.losses.reduce import REDUCERS, StepNormalizer
from align.losses.rollout_correction import ROLLOUT_CORRECTIONS, RolloutCorrection
from align.losses.value import VALUE_LOSSES

__all__ = [
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "REDUCERS",
    "ROLLOUT_CORRECTIONS",
    "VALUE_LOSSES",
    "PolicyInputs",
    "PreferenceInputs",
    "RolloutCorrection",
    "StepNormalizer",
    "aligndistil_teacher",
    "kl_reward_penalty",
]
