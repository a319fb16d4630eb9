"""align: RL alignment for language models with token- and sequence-level objectives as first-class parts.

Importable with torch alone. Entry points: :mod:`align.functional` (advantages, policy_objective,
preference_loss), :mod:`align.algorithms` (AlgorithmSpec and presets), and the registries in
:mod:`align.losses` and :mod:`align.advantages`.
"""

__version__ = "0.1.0"
