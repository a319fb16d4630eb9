"""Token-level samples for reports: a few completions per sampled step, each token with its credit.

Written to ``samples.jsonl`` in the run directory, one line per completion, bounded in total size. The first group
of the step is recorded (several completions of one prompt), so a report can set the completions that GRPO pushed
up beside the ones it pushed down.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from align.trainers.jsonl import Warn, keep_steps_up_to, read_jsonl, warn_on_stderr
from align.trainers.protocols import Rollout

Diagnostics = Callable[[Rollout, Tensor], dict[str, Tensor]]
"""(rollout rows, their sequence rewards) -> credit module name -> (b, T) per-token credit."""


class SampleRecorder:
    def __init__(self, run_dir: Path, tokenizer: Any, *, per_step: int, max_bytes: int,
                 diagnostics: Diagnostics | None = None, warn: Warn = warn_on_stderr) -> None:
        self.path = run_dir / "samples.jsonl"
        self.warn = warn
        self.tokenizer, self.per_step, self.max_bytes = tokenizer, per_step, max_bytes
        self.diagnostics = diagnostics
        self.full = self.path.exists() and self.path.stat().st_size >= max_bytes

    def record(self, step: int, rollout: Rollout, rewards: Tensor, advantages: Tensor,
               credit: dict[str, Tensor] | None = None) -> int:
        """Append up to ``per_step`` completions of the step's first group; returns how many were written."""
        if self.full or self.per_step == 0 or len(rollout) == 0:
            return 0
        first = rollout.group_ids[0]
        rows = (rollout.group_ids == first).nonzero().squeeze(-1)[: self.per_step]
        subset = rollout.select(rollout.group_ids == first)
        subset = subset.select(torchify_first(len(subset), len(rows)))
        credits: dict[str, Tensor] = {"advantage": advantages[rows]}
        for name, values in (credit or {}).items():
            credits[name] = values[rows]
        if self.diagnostics is not None:
            credits.update(self.diagnostics(subset, rewards[rows]))
        lines = []
        for j, i in enumerate(rows.tolist()):
            positions = (rollout.mask[i] != 0).nonzero().squeeze(-1).tolist()
            ids = [int(rollout.completion_ids[i, t]) for t in positions]
            lines.append(json.dumps({
                "step": step, "row": i, "prompt": rollout.prompts[i], "completion": rollout.completions[i],
                # multi-turn rollouts (align.envs): the whole episode, observations included; token_ids and credit
                # below are the model's own tokens
                **({"transcript": rollout.columns["transcript"][i]} if "transcript" in rollout.columns else {}),
                "reward": float(rewards[i]), "token_ids": ids,
                "tokens": [self.tokenizer.decode([t]) for t in ids],
                "credit": {name: [round(float(v[j, t]), 6) for t in positions] for name, v in credits.items()},
            }))
        text = "".join(line + "\n" for line in lines)
        size = self.path.stat().st_size if self.path.exists() else 0
        if size + len(text.encode()) > self.max_bytes:
            self.full = True
            return 0
        with open(self.path, "a") as f:
            f.write(text)
        return len(lines)

    def truncate_after(self, step: int) -> None:
        """Drop the samples of steps after ``step`` (a resumed run records them again), and a torn last line."""
        keep_steps_up_to(self.path, step, self.warn)
        self.full = self.path.exists() and self.path.stat().st_size >= self.max_bytes


def torchify_first(size: int, count: int) -> Tensor:
    """(size,) bool mask selecting the first ``count`` rows."""
    import torch

    mask = torch.zeros(size, dtype=torch.bool)
    mask[:count] = True
    return mask


def read_samples(run_dir: Path, warn: Warn = warn_on_stderr) -> list[dict[str, Any]]:
    """The rows of ``samples.jsonl`` (a torn last line dropped with a warning)."""
    return read_jsonl(run_dir / "samples.jsonl", warn)
