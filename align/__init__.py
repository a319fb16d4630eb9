"""align: RL alignment for language models with token- and sequence-level objectives as first-class parts.

Importable with torch alone. Entry points: :func:`align.train` (a recipe in, a run directory out),
:mod:`align.functional` (advantages, policy_objective, preference_loss), :mod:`align.algorithms` (AlgorithmSpec and
presets), and the registries in :mod:`align.losses` and :mod:`align.advantages`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def train(recipe: Any, *overrides: str, **kwargs: Any) -> Any:
    """Train from a recipe (path, dict or Recipe) with ``key.path=value`` overrides; see :func:`align.api.train`.

    >>> result = align.train("recipes/quickstart.yaml", "learner.steps=100")  # doctest: +SKIP
    >>> result.run_dir, result.metrics["eval/accuracy_after"]  # doctest: +SKIP
    """
    from align.api import train as run

    return run(recipe, *overrides, **kwargs)
