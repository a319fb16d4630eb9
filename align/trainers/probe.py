"""The check that makes a silent weight-sync failure loud, for every engine that keeps its own copy of the weights.

After a sync a fixed probe batch is sampled by the engine and scored by the learner: if the largest per-token
log-prob gap exceeds the tolerance, or the engine reports another weight version, the engine is not sampling the
weights being trained (a stale or partial sync, the bug behind verl #3821 and OpenRLHF #1349) and the run stops
with an error naming both versions and the gap. The controller runs it whenever the engine does not share the
learner's module (vLLM in-process or on Ray, any engine behind a Ray actor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from align.errors import AlignError
from align.trainers.protocols import Learner, Rollout, RolloutEngine, SamplingParams


class StaleWeightsError(AlignError, RuntimeError):
    """The rollout engine samples from weights other than the learner's."""



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

    def __call__(self, engine: RolloutEngine, learner: Learner, learner_version: int, seed: int) -> ProbeResult:
        """Sample the probe prompts with ``engine`` and check them against ``learner``."""
        rollout = engine.generate(self.prompts, {}, samples_per_prompt=1, params=self.params, seed=seed)
        return self.check(rollout, learner.logprobs(rollout), learner_version)

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
