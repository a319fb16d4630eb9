"""How a learner applies gradients (:class:`Strategy`): plain torch in one process (:class:`TorchStrategy`), or a
DeepSpeed engine on one of several ranks (``ray_jobs.learner_deepspeed``); and the frozen reference policy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor


class Strategy(Protocol):
    """Applies a learner's gradients: plain torch in one process, or a DeepSpeed engine on one of several ranks."""

    model: Any  # the trained model (under LoRA the PEFT model)
    module: Any  # what forward passes run on: the model, or the DeepSpeed engine around it

    def backward(self, loss: Tensor, *, boundary: bool) -> None:
        """Accumulate the gradient of ``loss`` (this rank's share); ``boundary``: the optimiser step's last one."""
        ...

    def optimizer_step(self) -> float:
        """Clip, step, clear the gradients; returns the global gradient norm before clipping."""
        ...

    def agree(self, count: int) -> int:
        """The largest ``count`` over ranks. Ranks run as many forward passes as the busiest one (with stand-ins
        at loss scale 0), since partitioned weights (ZeRO-3) are gathered collectively in every forward."""
        ...

    def agree_min(self, values: Sequence[int]) -> list[int]:
        """The element-wise minimum of ``values`` (K,) over ranks (negate an entry for its maximum); every rank calls
        it at the same point. Used where ranks must take the same path through the model (as many forward calls,
        in the same order), such as the shared-prompt forward (:mod:`align.trainers.shared_prefix`)."""
        ...

    def scheduler_step(self) -> None: ...

    def lr(self) -> float: ...

    def full_state(self) -> dict[str, Tensor]:
        """Every weight of the model on CPU (gathered where a strategy partitions them)."""
        ...

    def save(self, directory: Path) -> None:
        """Weights, optimiser and scheduler state into ``directory`` (every rank calls it)."""
        ...

    def load(self, directory: Path) -> None: ...


class TorchStrategy:
    """One process: ``loss.backward()``, gradient clipping, the optimiser and the scheduler."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                 max_grad_norm: float | None) -> None:
        self.model = self.module = model
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]

    def backward(self, loss: Tensor, *, boundary: bool) -> None:
        loss.backward()

    def agree(self, count: int) -> int:
        return count

    def agree_min(self, values: Sequence[int]) -> list[int]:
        return list(values)

    def optimizer_step(self) -> float:
        for p in self.params:  # a parameter no loss reached has gradient 0 (the optimiser still steps)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                               for p in self.params if p.grad is not None])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def scheduler_step(self) -> None:
        self.scheduler.step()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def full_state(self) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        weights = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items() if k in trainable}
        save_file(weights, str(directory / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(directory / "model.safetensors"))
        unknown = set(weights) - set(self.model.state_dict())
        if unknown:
            raise ValueError(f"checkpoint {directory} has weights the model lacks (e.g. {sorted(unknown)[0]!r})")
        self.model.load_state_dict(weights, strict=False)
        state = torch.load(directory / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# ---------------------------------------------------------------------------------------------------------------
# The reference policy
# ---------------------------------------------------------------------------------------------------------------
class Reference:
    """The frozen reference policy: under LoRA the base model with its adapters disabled (no second copy), else a
    frozen copy of the initial weights."""

    def __init__(self, model: Any, *, lora: bool) -> None:
        self._model = model
        self._frozen = None
        if not lora:
            import copy

            self._frozen = copy.deepcopy(model).eval()
            for p in self._frozen.parameters():
                p.requires_grad_(False)

    @contextmanager
    def model(self) -> Iterator[Any]:
        if self._frozen is not None:
            yield self._frozen
            return
        with self._model.disable_adapter():
            yield self._model
