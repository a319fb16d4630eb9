"""Checkpoints that never corrupt the last good one, and exact resume: one writer for every runtime.

A checkpoint ``step-XXXXXXXX/`` holds ``learner/`` (what the learner's strategy writes: trainable weights or a PEFT
adapter, optimiser and scheduler in-process; DeepSpeed's sharded checkpoint from every rank on Ray),
``state.json`` (the controller's state: step, data order, weight version, ...), ``tensors.pt`` where that state
holds tensors (the generation batches in flight under ``runtime.max_staleness``: ``state.json`` names each by a
``{"__tensor__": key}`` stand-in) and ``rng.pt`` (every RNG state of the controller: python, torch, CUDA where
present). Everything is written into a temporary directory, fsynced, and renamed into place only when complete;
``latest`` (a one-line file, replaced atomically) then points at it. A crash while saving leaves the previous
checkpoint and pointer untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"
# 1: model.safetensors + trainer.pt beside state.json (local only); 2: learner/ + rng.pt; 3: tensors.pt where the
# state holds tensors (a version that reads 2 would resume a 3 without its batches in flight: it refuses instead)
SCHEMA = 3
READS = (2, 3)
TENSOR = "__tensor__"


@dataclass
class TrainingState:
    step: int
    extra: dict[str, Any]  # the controller's state: JSON values and tensors


def split_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor in it (in dicts and lists, at any depth) moved into ``tensors`` and replaced by
    ``{"__tensor__": key}``."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu()
        return {TENSOR: key}
    if isinstance(value, dict):
        return {k: split_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, tensors) for v in value]
    return value


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # generate() samples with the CUDA generator on a GPU
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, *, step: int, save_learner: Callable[[Path], None], extra: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``directory/step-XXXXXXXX`` atomically and point ``latest`` at it; keep the newest ``keep``.

    ``save_learner(path)`` writes the learner's part into ``path`` (a directory inside the temporary checkpoint).
    ``extra``: JSON values, and tensors anywhere in it (written to ``tensors.pt``, in the same atomic rename).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_learner(tmp / "learner")
    torch.save(rng_state(), tmp / "rng.pt")
    tensors: dict[str, torch.Tensor] = {}
    state = split_tensors(extra, tensors)
    if tensors:
        torch.save(tensors, tmp / "tensors.pt")
    (tmp / "state.json").write_text(json.dumps({"schema": SCHEMA, "step": step, "extra": state}))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)  # atomic on one filesystem: the checkpoint appears whole or not at all
    pointer = directory / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    with open(pointer, "rb") as f:
        os.fsync(f.fileno())
    os.replace(pointer, directory / LATEST)
    _fsync_dir(directory)
    for old in sorted(p for p in directory.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(root: Path) -> None:
    """Every file and directory under ``root`` on disk (a DeepSpeed checkpoint nests directories)."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest`` points at, if it exists whole."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    candidate = directory / pointer.read_text().strip()
    return candidate if (candidate / "state.json").is_file() else None


def load_checkpoint(path: Path, *, load_learner: Callable[[Path], None]) -> TrainingState:
    """Restore the learner (through ``load_learner``) and the RNG states; returns the step and the extra state."""
    state = json.loads((path / "state.json").read_text())
    if state.get("schema") not in READS:
        raise ValueError(f"checkpoint {path} has schema {state.get('schema', 1)}; this version reads schemas "
                         f"{', '.join(map(str, READS))} (resume it with the version that wrote it)")
    load_learner(path / "learner")
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    tensors = torch.load(path / "tensors.pt", weights_only=True) if (path / "tensors.pt").is_file() else {}
    return TrainingState(step=int(state["step"]), extra=join_tensors(state["extra"], tensors))
