"""The reward registry: plain Python functions that score completions, one float (or None) per completion.

A reward is registered with :func:`reward` (a decorator) or :func:`register_reward`. It may be

* per-sample: called once per completion with singular keyword arguments ``prompt``, ``completion``,
  ``completion_ids``, ``step`` and every dataset column (``answer=...``), returning a float or None; or
* batched (``batched=True``): called once per batch with ``prompts``, ``completions``, ``completion_ids``, ``step``
  and every column as a list, returning a list with one float or None per completion (TRL's convention);

and sync or ``async``. A function receives only the keyword arguments its signature names (all of them if it takes
``**kwargs``); keyword-only parameters that are not data become options, set per recipe (``options:``). An option's
annotation is its contract, checked when the recipe is (``align validate``): ``Literal["auto", "tag"]`` takes those
values only, ``int``, ``float``, ``bool`` and ``str`` take that type (``float`` takes ints too), ``X | None`` adds
null, and ``Annotated[int, Ge(1)]`` (``annotated_types``' ``Ge``, ``Gt``, ``Le``, ``Lt``) adds a bound; any other
annotation is left to the function.
"""

from __future__ import annotations

import difflib
import inspect
import operator
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

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
    annotations: Mapping[str, Any] = field(default_factory=dict)  # parameter -> its resolved type annotation
    # checks the machine can run the reward with these options (``align validate`` calls it); raises one line
    preflight: Callable[[Mapping[str, Any]], None] | None = None

    def accepts(self, key: str) -> bool:
        return self.takes_var_kwargs or key in self.parameters

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise a one-line error for an option the function does not take, that shadows a data field, or whose
        value its annotation refuses."""
        for key in options:
            self.check_name(key)
        for key, value in options.items():
            self.check_value(key, value)

    def check_name(self, key: str) -> None:
        if key in (BATCH_FIELDS if self.batched else SAMPLE_FIELDS):
            raise InputError(f"reward {self.name!r}: option {key!r} would shadow the data field of that name")
        if not self.accepts(key):
            valid = ", ".join(sorted(self.options)) or "(none)"
            raise InputError(f"reward {self.name!r} has no option {key!r}; valid options: {valid}")

    def check_value(self, key: str, value: Any) -> None:
        if key not in self.annotations:
            return
        wanted = value_problem(self.annotations[key], value)
        if wanted is not None:
            hint = difflib.get_close_matches(value, _literal_strings(self.annotations[key]), n=1) \
                if isinstance(value, str) else []
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise InputError(f"reward {self.name!r}: option {key!r} takes {wanted}; got {value!r}{maybe}")


def value_problem(annotation: Any, value: Any) -> str | None:
    """None when ``value`` fits ``annotation`` as far as a plain check can tell, else what would fit, in words.
    Values are checked, never converted: the function receives exactly what the recipe says."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *marks = typing.get_args(annotation)
        limits = [(sign, bound, holds) for mark in marks for attr, sign, holds in _LIMITS
                  if (bound := getattr(mark, attr, None)) is not None]
        if value_problem(base, value) is None and _within(value, limits):
            return None
        words = value_problem(base, _NO_VALUE) or "a value"  # what the base takes, whatever the value was
        return " ".join([words, *(f"{sign} {bound}" for sign, bound, _ in limits)])
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if any(value == a and type(value) is type(a) for a in allowed):  # type too: True is not Literal[1]
            return None
        return "one of " + ", ".join(repr(a) for a in allowed)
    if origin in (typing.Union, types.UnionType):
        problems = [value_problem(arm, value) for arm in typing.get_args(annotation)]
        return None if None in problems else " or ".join(p for p in problems if p)
    plain: dict[Any, tuple[Callable[[Any], bool], str]] = {
        type(None): (lambda v: v is None, "null"),
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
        str: (lambda v: isinstance(v, str), "a string"),
    }
    if annotation in plain:
        fits, words = plain[annotation]
        return None if fits(value) else words
    return None  # sequences, classes, Any: the function's own check applies when it runs


_LIMITS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))
_NO_VALUE = object()  # fits no plain type: value_problem(base, _NO_VALUE) says in words what base takes


def _within(value: Any, limits: list[tuple[str, Any, Callable[[Any, Any], bool]]]) -> bool:
    try:
        return all(holds(value, bound) for _, bound, holds in limits)
    except TypeError:  # a bound on a base this check does not know (Annotated[list, Ge(1)]): not comparable
        return False


def _literal_strings(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is Literal:
        return [a for a in typing.get_args(annotation) if isinstance(a, str)]
    return [s for arm in typing.get_args(annotation) for s in _literal_strings(arm)]


def _annotations(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's resolved annotations; none when they do not resolve here (a plugin's forward reference):
    its options then go unchecked rather than unusable."""
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__  # a callable object
    try:
        return typing.get_type_hints(target, include_extras=True)  # extras: the bounds of Annotated
    except Exception:
        return {}


REWARDS: Registry[RewardFunction] = Registry("reward")


def _describe(name: str, fn: Callable[..., Any], batched: bool, timeout: float | None,
              preflight: Callable[[Mapping[str, Any]], None] | None = None) -> RewardFunction:
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
    return RewardFunction(name, fn, batched, is_async, timeout, params, var_kw, options, _annotations(fn), preflight)


def register_reward(
    name: str, fn: Callable[..., Any], *, batched: bool = False, timeout: float | None = None,
    preflight: Callable[[Mapping[str, Any]], None] | None = None,
) -> RewardFunction:
    """Register ``fn`` under ``name`` (duplicate names fail) and return its description. ``preflight(options)``,
    when given, raises a one-line error where this machine cannot run the reward with those options (checked by
    ``align validate`` and before training starts)."""
    return REWARDS.register(name, _describe(name, fn, batched, timeout, preflight))


def reward(name: str, *, batched: bool = False, timeout: float | None = None,
           preflight: Callable[[Mapping[str, Any]], None] | None = None) -> Callable[[F], F]:
    """Decorator form of :func:`register_reward`; the function itself is returned unchanged.

    >>> @reward("has_answer")
    ... def has_answer(completion: str) -> float:
    ...     return float("answer" in completion)
    """

    def decorate(fn: F) -> F:
        register_reward(name, fn, batched=batched, timeout=timeout, preflight=preflight)
        return fn

    return decorate
