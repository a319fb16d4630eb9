"""Checkpoints that never corrupt the last good one, and exact resume.

A checkpoint directory holds the trainable weights (``model.safetensors``, or a PEFT adapter), the optimiser and
scheduler state, every RNG state (python, torch) and the data order, written into a temporary directory that is
renamed into place only when complete; ``latest`` (a one-line file, replaced atomically) then points at it. A crash
while saving leaves the previous checkpoint and pointer untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


@dataclass
class TrainingState:
    step: int
    extra: dict[str, Any]  # sampler state, counters: JSON-serialisable


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
            if k in names or not names}


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


def save_checkpoint(directory: Path, *, step: int, model: Any, optimizer: Any, scheduler: Any,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    """Write ``directory/step-XXXXXXXX`` atomically and point ``latest`` at it; keep the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable_state(model), str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "extra": extra}))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)  # atomic on one filesystem: the checkpoint appears whole or not at all
    pointer = directory / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, directory / LATEST)
    _fsync_dir(directory)
    for old in sorted(p for p in directory.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir() if path.is_dir() else []:
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
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


def load_checkpoint(path: Path, *, model: Any, optimizer: Any, scheduler: Any) -> TrainingState:
    """Restore weights, optimiser, scheduler and RNG states; returns the step and the extra state."""
    weights = load_file(str(path / "model.safetensors"))
    missing = set(weights) - set(model.state_dict())
    if missing:
        raise ValueError(f"checkpoint {path} has weights the model lacks (e.g. {sorted(missing)[0]!r})")
    model.load_state_dict(weights, strict=False)
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    state = json.loads((path / "state.json").read_text())
    return TrainingState(step=int(state["step"]), extra=state["extra"])
