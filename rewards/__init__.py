"""Reward functions and credit assignment (sequence rewards -> token rewards), built on :mod:`align`.

Importable with torch alone: this package never imports ray, vllm or deepspeed (transformers and math-verify are
imported only by the rewards that use them, when they run).

    import rewards

    @rewards.reward("brevity")
    def brevity(completion: str) -> float:
        return -len(completion) / 100
"""

from rewards import credit, functions  # noqa: F401  (registers the built-ins)
from rewards.combine import RewardBatch, RewardComposer, RewardScores, RewardTerm
from rewards.plugins import load_entry_points, load_plugins
from rewards.registry import REWARDS, RewardFunction, register_reward, reward

__all__ = [
    "REWARDS",
    "RewardBatch",
    "RewardComposer",
    "RewardFunction",
    "RewardScores",
    "RewardTerm",
    "credit",
    "load_entry_points",
    "load_plugins",
    "register_reward",
    "reward",
]
