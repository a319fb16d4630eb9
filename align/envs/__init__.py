"""Multi-turn rollouts with environments and tools, token in and token out.

- :mod:`align.envs.protocol`: the :class:`Environment` protocol (``reset`` / ``step`` -> :class:`StepResult`), the
  :data:`ENVIRONMENTS` registry and the ``@environment("name")`` decorator;
- :mod:`align.envs.calculator`: the ``calculator`` tool environment (safe arithmetic, no ``eval``);
- :mod:`align.envs.rollout`: :class:`MultiTurnEngine`, a rollout engine over any token engine;
- :mod:`align.envs.build`: ``rollout.environment`` checked and wired into a run, on either runtime.
"""

from align.envs import calculator  # noqa: F401  (registers)
from align.envs.protocol import ENVIRONMENTS, Environment, StepResult, environment
from align.envs.rollout import ChatObservations, MultiTurnEngine, TextObservations

__all__ = ["ENVIRONMENTS", "ChatObservations", "Environment", "MultiTurnEngine", "StepResult", "TextObservations",
           "environment"]
