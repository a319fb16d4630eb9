"""Prompt order with a resumable state: a seeded permutation per epoch and a cursor."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptSampler:
    size: int
    seed: int
    epoch: int = 0
    cursor: int = 0

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def next(self, count: int) -> list[int]:
        """The next ``count`` indices, continuing into a new epoch (and a new permutation) when one ends."""
        out: list[int] = []
        order = self._order()
        while len(out) < count:
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            take = min(count - len(out), self.size - self.cursor)
            out.extend(order[self.cursor : self.cursor + take])
            self.cursor += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:
            raise ValueError(f"the checkpoint's dataset had {state['size']} prompts, this one has {self.size}")
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
