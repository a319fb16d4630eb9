"""The environment protocol of multi-turn rollouts: the model acts in text, the environment answers in text.

One environment instance per sampled row: ``reset(prompt, columns)`` starts its episode (``columns`` are the row's
dataset columns, e.g. ``answer``), then ``step(action)`` gets each model turn's decoded text and returns a
:class:`StepResult`: the observation to show the model next, this turn's reward, and whether the episode is over.
Environments are registered by name in :data:`ENVIRONMENTS` (``@environment("name")`` on a class or factory whose
keyword arguments are the recipe's ``rollout.environment.options``); a recipe's ``plugins:`` module can register
its own.

An environment may also set ``stop`` (a tuple of strings): a model turn ends at the first token that completes one
of them (e.g. ``"</calc>"``, the end of a tool call), as well as at EOS or ``rollout.max_new_tokens``.

The rollout columns below are what :class:`~align.envs.rollout.MultiTurnEngine` adds to each row, for rewards
(which receive columns by name), credit modules (``turn_rewards``) and metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from align.registry import Registry

TURN_REWARDS = "turn_rewards"  # list[float]: the environment's reward for each model turn, in order
TURN_ENDS = "turn_ends"  # list[int]: the completion index of each model turn's last token
NUM_TURNS = "num_turns"  # int: model turns
TOOL_CALLS = "tool_calls"  # int: turns the environment answered and continued (done False)
OBSERVATION_TOKENS = "observation_tokens"  # int: environment tokens in the completion (mask 0)
TRUNCATED = "truncated"  # bool: stopped by max_total_tokens before the environment said done
OUT_OF_TURNS = "out_of_turns"  # bool: stopped by max_turns before the environment said done
TRANSCRIPT = "transcript"  # str: the whole decoded completion, observations included (no special tokens)
COLUMNS = (TURN_REWARDS, TURN_ENDS, NUM_TURNS, TOOL_CALLS, OBSERVATION_TOKENS, TRUNCATED, OUT_OF_TURNS, TRANSCRIPT)


@dataclass(frozen=True)
class StepResult:
    """What an environment returns for one model turn."""

    observation: str  # text shown to the model before its next turn (ignored when done)
    reward: float = 0.0  # this turn's reward (e.g. a penalty for a malformed tool call)
    done: bool = False  # the episode is over: this turn was the model's last


class Environment(Protocol):
    """One episode per instance. Optional attribute ``stop: tuple[str, ...]``: strings that end a model turn."""

    def reset(self, prompt: str, columns: Mapping[str, Any]) -> None:
        """Start the episode of one sampled row: its prompt text and its dataset columns."""
        ...

    def step(self, action: str) -> StepResult:
        """The model's turn, decoded without special tokens -> the observation, the turn's reward, done."""
        ...


EnvironmentFactory = Callable[..., Environment]
ENVIRONMENTS: Registry[EnvironmentFactory] = Registry("environment")
F = TypeVar("F", bound=EnvironmentFactory)


def environment(name: str) -> Callable[[F], F]:
    """Register an environment class (or factory) under ``name``; its keyword-only arguments are its options.

    >>> @environment("echo")
    ... class Echo:
    ...     def reset(self, prompt, columns): self.turns = 0
    ...     def step(self, action):
    ...         self.turns += 1
    ...         return StepResult(observation=f"[{action}]", done=self.turns == 2)
    """

    def add(factory: F) -> F:
        ENVIRONMENTS.register(name, factory)
        return factory

    return add
