"""Exceptions raised by the toolkit.

Every error carries a one-line message that says what was wrong and what would be right, so the CLI can print it
without a traceback. They subclass the built-in type a caller would naturally catch (``ValueError``, ``KeyError``).
"""

from __future__ import annotations


class AlignError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class UnknownNameError(AlignError, KeyError):
    """A registry lookup used a name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(AlignError, ValueError):
    """A registry already holds an entry under this name."""


class InputError(AlignError, ValueError):
    """A tensor argument has the wrong shape, dtype or values (for example NaN where the mask is 1)."""


class IncompatibleSpecError(AlignError, ValueError):
    """An algorithm composition is incoherent; the message names the nearest valid alternative."""
