"""The reward registry: plain Python functions that score completions, one float (or None) per completion.

A reward is registered with :func:`reward` (a decorator) or :func:`register_reward`. It may be

* per-sample: called once per completion with singular keyword arguments ``prompt``, ``completion``,
  ``completion_ids``, ``step`` and every dataset column (``answer=...``), returning a float or None; or
* batched (``batched=True``): called once per batch with ``prompts``, ``completions``, ``completion_ids``, ``step``
  and every column as a list, returning a list with one float or None per completion (TRL's convention);

and sync or ``async``. A function receives only the keyword arguments its signature names (all of them if it takes
``**kwargs``); keyword-only parameters that are not data become options, set per recipe (``options:``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from align.errors import InputError
from align.registry import Registry

F = TypeVar("F", bound=Callable[..., Any])

SAMPLE_FIELDS = frozenset({"prompt", "completion", "completion_ids", "step"})
BATCH_FIELDS = frozenset({"prompts", "completions", "completion_ids", "step"})


@dataclass(frozen=True)
class RewardFunction:
    """A registered reward and what the runner needs to know to call it."""

    name: str
    fn: Callable[..., Any]
    batched: bool
    is_async: bool
    timeout: float | None  # seconds per call; None = the composer's default
    parameters: tuple[str, ...]  # keyword arguments the function accepts by name
    takes_var_kwargs: bool
    options: Mapping[str, Any] = field(default_factory=dict)  # keyword-only parameters with defaults

    def accepts(self, key: str) -> bool:
        return self.takes_var_kwargs or key in self.parameters

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise a one-line error for options the function does not take or that shadow data fields."""
        data = BATCH_FIELDS if self.batched else SAMPLE_FIELDS
        for key in options:
            if key in data:
                raise InputError(f"reward {self.name!r}: option {key!r} would shadow the data field of that name")
            if not self.accepts(key):
                valid = ", ".join(sorted(self.options)) or "(none)"
                raise InputError(f"reward {self.name!r} has no option {key!r}; valid options: {valid}")


REWARDS: Registry[RewardFunction] = Registry("reward")


def _describe(name: str, fn: Callable[..., Any], batched: bool, timeout: float | None) -> RewardFunction:
    if not callable(fn):
        raise InputError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    if timeout is not None and timeout <= 0:
        raise InputError(f"reward {name!r}: timeout must be > 0 seconds, got {timeout}")
    sig = inspect.signature(fn)
    params = tuple(p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    options = {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY
               and p.default is not p.empty}
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)
    return RewardFunction(name, fn, batched, is_async, timeout, params, var_kw, options)


def register_reward(
    name: str, fn: Callable[..., Any], *, batched: bool = False, timeout: float | None = None
) -> RewardFunction:
    """Register ``fn`` under ``name`` (duplicate names fail) and return its description."""
    return REWARDS.register(name, _describe(name, fn, batched, timeout))


def reward(name: str, *, batched: bool = False, timeout: float | None = None) -> Callable[[F], F]:
    """Decorator form of :func:`register_reward`; the function itself is returned unchanged.

    >>> @reward("has_answer")
    ... def has_answer(completion: str) -> float:
    ...     return float("answer" in completion)
    """

    def decorate(fn: F) -> F:
        register_reward(name, fn, batched=batched, timeout=timeout)
        return fn

    return decorate
