"""The sweep manifest, ``<sweep dir>/sweep.json``: every planned run, its status and its run directory.

Written by ``align sweep`` (:mod:`align.sweep`) at the start and again after every run ends, always whole (written
to a temporary file and renamed), so a sweep killed at any moment leaves a manifest that lists what finished. Read
by ``align report`` to pool a method's seeds. Run directories are stored relative to the sweep directory, so the
sweep directory can be moved or copied as a whole.

Statuses: ``planned`` (not run yet, or interrupted), ``done``, ``failed`` (with the one-line error) and ``skipped``
(finished by an earlier invocation of the same sweep; left as it was).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align.errors import InputError

MANIFEST = "sweep.json"
VERSION = 1
STATUSES = ("planned", "done", "failed", "skipped")
FINISHED = ("done", "skipped")
_STAMP = r"-\d{8}-\d{6}(-\d+)?"  # what align.build.new_run_dir appends to a run's name


@dataclass
class RunRecord:
    """One planned run of a sweep."""

    id: str  # the run's name: <recipe name>[-<key=value>...]-seed<k>; its directory is <id>-<time>
    recipe: str  # the recipe file (absolute path)
    method: str  # what the report pools seeds by: the recipe name and the swept values
    overrides: list[str]  # every key=value the sweep applies besides seed, name and logging.dir
    seed: int
    status: str = "planned"
    error: str | None = None
    dir: str | None = None  # relative to the sweep directory
    final: dict[str, float] = field(default_factory=dict)  # held-out accuracy before and after, from summary.json


@dataclass
class Manifest:
    """The runs of one sweep directory, in plan order (runs of earlier plans that this one dropped stay listed)."""

    root: Path
    runs: dict[str, RunRecord] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / MANIFEST

    def run_dir(self, record: RunRecord) -> Path | None:
        return None if record.dir is None else self.root / record.dir

    def save(self) -> None:
        """Write the manifest whole or not at all."""
        payload = {"version": VERSION, "runs": [asdict(r) for r in self.runs.values()]}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.path)


def is_sweep_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def load_manifest(root: Path) -> Manifest:
    """The manifest of sweep directory ``root``; an empty one where there is none yet. One-line InputError where the
    file is not a manifest."""
    path = root / MANIFEST
    if not path.is_file():
        return Manifest(root)
    try:
        payload = json.loads(path.read_text())
        runs = [RunRecord(**r) for r in payload["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        detail = " ".join(str(err).split())[:120]
        raise InputError(f"{path}: not a readable sweep manifest ({type(err).__name__}: {detail}); move it away to "
                         "start the sweep's bookkeeping afresh (the run directories beside it are kept)") from None
    bad = next((r for r in runs if r.status not in STATUSES), None)
    if bad is not None:
        raise InputError(f"{path}: run {bad.id!r} has status {bad.status!r}; valid: {', '.join(STATUSES)}")
    return Manifest(root, {r.id: r for r in runs})


def run_dirs_of(root: Path, run_id: str) -> list[Path]:
    """The run directories named after ``run_id`` under ``root`` (``<id>-<time>``), oldest first."""
    own = re.compile(re.escape(run_id) + _STAMP)
    found = [p for p in root.glob(f"{glob_escape(run_id)}-*") if p.is_dir() and own.fullmatch(p.name)]
    return sorted(found, key=lambda p: _stamp_key(p.name, run_id))


def _stamp_key(name: str, run_id: str) -> tuple[str, int]:
    stamp = name[len(run_id) + 1:]  # YYYYMMDD-HHMMSS[-k]
    day, clock, *suffix = stamp.split("-")
    return f"{day}-{clock}", int(suffix[0]) if suffix else 1


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def read_json_mapping(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None where it is missing, cut short or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
