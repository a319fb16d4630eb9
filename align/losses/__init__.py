"""Losses and their registries: policy losses, reducers, KL estimators and preference losses."""

from align.losses.kl import KL_ESTIMATORS, kl_reward_penalty
from align.losses.policy import POLICY_LOSSES, PolicyInputs
from align.losses.preference import PREFERENCE_LOSSES, PreferenceInputs
from align.losses.reduce import REDUCERS, StepNormalizer

__all__ = [
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "REDUCERS",
    "PolicyInputs",
    "PreferenceInputs",
    "StepNormalizer",
    "kl_reward_penalty",
]
