"""Weight sync from the learner to the rollout engine, and the check that makes a silent failure loud.

Payloads are safetensors bytes of the full policy weights (on CPU; on GPU the same module broadcasts over NCCL from
learner rank 0, exercised where a GPU is lent). After each sync a fixed probe batch is sampled by the engine and
scored by the learner: if the largest per-token log-prob gap exceeds the tolerance, the engine is not sampling the
weights being trained (a stale or partial sync, the bug behind verl #3821 and OpenRLHF #1349) and the run stops
with an error naming both versions and the gap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from align.errors import AlignError
from align.trainers.protocols import Rollout, SamplingParams


class StaleWeightsError(AlignError, RuntimeError):
    """The rollout engine samples from weights other than the learner's."""


def state_to_bytes(state: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    # clones: tied weights (embeddings and lm_head) share storage, which safetensors refuses
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def bytes_to_state(payload: bytes) -> dict[str, Tensor]:
    return load_safetensors(payload)


@dataclass(frozen=True)
class ProbeResult:
    engine_version: int
    learner_version: int
    max_gap: float
    mean_gap: float


class ProbeCheck:
    """Samples ``prompts`` with the engine and compares its log-probs with the learner's on the same tokens."""

    def __init__(self, prompts: Sequence[str], *, tolerance: float = 1e-3, max_new_tokens: int = 8,
                 temperature: float = 1.0) -> None:
        self.prompts, self.tolerance = list(prompts), tolerance
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)

    def __call__(self, engine: Any, learner_logprobs: Callable[[Rollout], Tensor],
                 learner_version: int) -> ProbeResult:
        """Sample the probe prompts with ``engine`` (in-process) and check them against the learner."""
        rollout: Rollout = engine.generate(self.prompts, {}, samples_per_prompt=1, params=self.params)
        with torch.no_grad():
            learner = learner_logprobs(rollout)
        return self.check(rollout, learner, learner_version)

    def check(self, rollout: Rollout, learner: Tensor, learner_version: int) -> ProbeResult:
        """Compare a probe rollout's log-probs with the learner's log-probs (B, T) on the same tokens."""
        gap = (learner - rollout.logp).abs() * rollout.mask
        result = ProbeResult(engine_version=rollout.weight_version, learner_version=learner_version,
                             max_gap=float(gap.max()), mean_gap=float(gap.sum() / rollout.mask.sum().clamp(min=1)))
        if result.max_gap > self.tolerance or result.engine_version != learner_version:
            raise StaleWeightsError(
                f"rollout engine (weights v{result.engine_version}) disagrees with the learner (v{learner_version}): "
                f"max log-prob gap {result.max_gap:.3g} > tolerance {self.tolerance:g}; the engine is sampling "
                "stale weights, stopping before training on them")
        return result
