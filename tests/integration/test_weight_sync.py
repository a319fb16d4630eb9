"""Weight sync is verified after every sync: a deliberately stale engine is caught, with versions and the gap."""

from __future__ import annotations

import pytest
import torch

from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.rollout_hf import HFRolloutEngine
from align.trainers.sequences import response_forward
from ray_jobs.weight_sync import ProbeCheck, StaleWeightsError, bytes_to_state, state_to_bytes


def _learner_logprobs(model):
    def score(rollout):
        logp, _, _ = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.mask)
        return logp

    return score


def test_stale_engine_is_detected_and_a_real_sync_passes() -> None:
    tokenizer = build_char_tokenizer()
    config = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=2)
    learner = build_tiny_causal_lm(len(tokenizer), config)
    engine_model = build_tiny_causal_lm(len(tokenizer), config)  # a separate copy, as in another process
    engine = HFRolloutEngine(engine_model, tokenizer)
    probe = ProbeCheck(["1+1=", "23+4=", "9+9="], tolerance=1e-4)
    torch.manual_seed(0)
    assert probe(engine, _learner_logprobs(learner), 0).max_gap < 1e-4  # same weights, same version

    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the learner takes a step...
    engine.weight_version = 1  # ...and the engine claims version 1 without loading it: a silent stale sync
    with pytest.raises(StaleWeightsError, match=r"weights v1\) disagrees with the learner \(v1\): max log-prob gap"):
        probe(engine, _learner_logprobs(learner), 1)

    payload = state_to_bytes(learner.state_dict())  # the real sync: bytes over the wire
    engine_model.load_state_dict(bytes_to_state(payload))
    engine.sync_weights(engine_model, 1)
    assert probe(engine, _learner_logprobs(learner), 1).max_gap < 1e-4
    with pytest.raises(StaleWeightsError, match=r"v1.*v2"):
        probe(engine, _learner_logprobs(learner), 2)  # a version mismatch alone is an error too
