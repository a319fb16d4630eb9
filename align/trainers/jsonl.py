"""The one reader of a run's JSONL logs (``metrics.jsonl``, ``samples.jsonl``), which a process appends to.

A process killed mid-write (``kill -9``, a full disk, a power cut) can leave the last line half-written, or filled
with NUL bytes; that line is dropped with a one-line warning, since everything before it is whole. An unreadable
line anywhere else means the file was damaged some other way: a one-line :class:`~align.errors.InputError` naming
the file and the line, rather than a guess about which rows to trust.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.errors import InputError

Warn = Callable[[str], None]


def warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_jsonl_lines(path: Path, warn: Warn = warn_on_stderr) -> list[tuple[str, dict[str, Any]]]:
    """(line as written, its row) for each line of ``path`` (none when it does not exist); every row is a JSON
    object with a ``step``."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    last = max((number for number, line in enumerate(lines, start=1) if line.strip()), default=0)
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse(line)
        if row is None and number == last:
            warn(f"{path}: line {number} is cut short (the process writing it was killed?); dropped it")
            continue
        if row is None:
            raise InputError(f"{path}: line {number} is not a JSON object with a step; the file is damaged: mend or "
                             "delete that line")
        rows.append((line.decode(), row))
    return rows


def read_jsonl(path: Path, warn: Warn = warn_on_stderr) -> list[dict[str, Any]]:
    """The rows of ``path``; see :func:`read_jsonl_lines`."""
    return [row for _, row in read_jsonl_lines(path, warn)]


def keep_steps_up_to(path: Path, step: int, warn: Warn = warn_on_stderr) -> None:
    """Rewrite ``path`` with the lines of steps up to ``step`` (a resumed run logs the later ones again), dropping a
    torn last line; the lines kept stay byte for byte. Atomic: a kill while rewriting leaves the old file."""
    if not path.exists():
        return
    kept = "".join(line + "\n" for line, row in read_jsonl_lines(path, warn) if row["step"] <= step)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(kept)
    os.replace(tmp, path)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line.decode())
    except (UnicodeDecodeError, ValueError):  # a write cut inside a multi-byte character, or inside the JSON
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None
