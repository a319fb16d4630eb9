"""Loading user code that registers rewards (and credit modules): recipe ``plugins:`` and entry points.

A plugin is any importable module whose import registers names, e.g. with ``@rewards.reward("my_reward")``.
Recipes list them under ``plugins: [my_module]``; installed packages can advertise them in the entry-point group
``align.rewards`` (``[project.entry-points."align.rewards"] my_rewards = "my_package.rewards"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points

from align.errors import InputError

ENTRY_POINT_GROUP = "align.rewards"
_loaded_entry_points: set[str] = set()


def load_plugins(modules: Iterable[str]) -> list[str]:
    """Import each module by dotted name (a failure names the module and the reason, in one line)."""
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise InputError(f"plugin {name!r} could not be imported: {err}; check the module name and PYTHONPATH") \
                from None
        except (Exception, SystemExit) as err:  # SystemExit too: a plugin's sys.exit() would end the CLI silently
            raise InputError(f"plugin {name!r} failed while being imported: {describe_failure(err)}; a plugin should "
                             "only register rewards when imported") from None
        loaded.append(name)
    return loaded


def describe_failure(err: BaseException) -> str:
    """One line for an exception raised by user code: its type and message (``sys.exit(7)`` says so)."""
    if isinstance(err, SystemExit):
        return f"it called sys.exit({err.code!r})"
    message = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every entry point of ``group`` once per process; returns the entry-point names loaded now."""
    loaded = []
    for ep in entry_points(group=group):
        key = f"{ep.name}={ep.value}"
        if key in _loaded_entry_points:
            continue
        try:
            ep.load()
        except (Exception, SystemExit) as err:
            raise InputError(f"entry point {ep.name!r} ({ep.value}) in group {group!r} failed to load: "
                             f"{describe_failure(err)}") from None
        _loaded_entry_points.add(key)
        loaded.append(ep.name)
    return loaded
