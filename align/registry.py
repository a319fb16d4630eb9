"""One small registry type for every pluggable part: losses, reducers, estimators, rewards, credit modules.

Unknown and duplicate names fail loudly and list the names that are known, so a typo in a recipe is a one-line
fix. Each entry may carry a small, read-only ``info`` mapping (for example the granularity of an advantage
estimator) that composition checks read without calling the entry.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar, overload

from align.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with helpful errors.

    >>> LOSSES: Registry[Callable[..., float]] = Registry("policy loss")
    >>> @LOSSES.register("ppo_clip")
    ... def ppo_clip(x): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._info: dict[str, Mapping[str, Any]] = {}

    @overload
    def register(self, name: str, obj: None = None, **info: Any) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, **info: Any) -> T: ...

    def register(self, name: str, obj: T | None = None, **info: Any) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does so."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def add(entry: T) -> T:
            if name in self._entries:
                raise DuplicateNameError(
                    f"{self.kind} {name!r} is already registered; pick another name "
                    f"(taken: {', '.join(self.names())})"
                )
            self._entries[name] = entry
            self._info[name] = MappingProxyType(dict(info))
            return entry

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """Return the entry called ``name``; an unknown name raises with the known names and a close match."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self._unknown_message(name)) from None

    def info(self, name: str) -> Mapping[str, Any]:
        """The read-only metadata given at registration."""
        self.get(name)
        return self._info[name]

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._entries))

    def _unknown_message(self, name: object) -> str:
        known = self.names()
        hint = difflib.get_close_matches(str(name), known, n=1)
        maybe = f"; did you mean {hint[0]!r}?" if hint else ""
        listing = ", ".join(known) if known else "(none registered)"
        return f"unknown {self.kind} {name!r}{maybe} known: {listing}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self.names())})"
