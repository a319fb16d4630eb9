"""Token in, token out (``generate_tokens``): what multi-turn and partial rollouts are built on."""

from __future__ import annotations

import pytest
import torch

from align.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.protocols import SamplingParams
from align.trainers.rollout_hf import HFRolloutEngine
from align.trainers.sequences import pad_left, pad_right, response_forward

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)


@pytest.fixture(scope="module")
def engine() -> HFRolloutEngine:
    tokenizer = build_char_tokenizer()
    return HFRolloutEngine(build_tiny_causal_lm(len(tokenizer), SMALL), tokenizer)


def test_generate_tokens_samples_one_continuation_per_row_with_the_learners_log_probs(engine) -> None:
    tokenizer = engine.tokenizer
    rows = [tokenizer("12+3=", add_special_tokens=False)["input_ids"]] * 3 + \
           [tokenizer("7+45=", add_special_tokens=False)["input_ids"]]
    params = SamplingParams(max_new_tokens=6, temperature=0.8)
    out = engine.generate_tokens(rows, params=params, seed=11)
    assert len(out.token_ids) == len(out.logp) == len(out.finished) == 4
    assert out.weight_version == engine.weight_version
    for ids, lp, done in zip(out.token_ids, out.logp, out.finished, strict=True):
        assert len(ids) == len(lp) and 1 <= len(ids) <= 6
        assert done == (ids[-1] == engine.eos_id)
        assert engine.eos_id not in ids[:-1]  # cut at the first EOS
    assert len({tuple(ids) for ids in out.token_ids[:3]}) > 1 or all(len(i) == 1 for i in out.token_ids[:3])
    # the log-probs are the learner's at the sampling temperature, on exactly these ids
    prompt_ids, prompt_mask = pad_left(rows, engine.pad_id)
    completion_ids, mask = pad_right(out.token_ids, engine.pad_id)
    with torch.no_grad():
        logp, _, _ = response_forward(engine.model, prompt_ids, prompt_mask, completion_ids, mask, temperature=0.8)
    for i, lp in enumerate(out.logp):
        assert torch.allclose(logp[i, : len(lp)], torch.tensor(lp), atol=1e-4)


def test_generate_tokens_is_seeded_and_leaves_the_callers_rng_alone(engine) -> None:
    rows = [engine.tokenizer("9+9=", add_special_tokens=False)["input_ids"]] * 4
    params = SamplingParams(max_new_tokens=5)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = engine.generate_tokens(rows, params=params, seed=5)
    after = torch.rand(1)
    b = engine.generate_tokens(rows, params=params, seed=5)
    assert a.token_ids == b.token_ids and a.logp == b.logp
    assert torch.equal(before, after)  # the caller's stream is untouched


def test_a_continuation_of_a_continuation_keeps_every_earlier_id(engine) -> None:
    """No re-tokenisation: the second call's input is the first call's ids, extended, exactly."""
    first_in = engine.tokenizer("3+4=", add_special_tokens=False)["input_ids"]
    first = engine.generate_tokens([first_in], params=SamplingParams(max_new_tokens=2), seed=1)
    second_in = first_in + first.token_ids[0]
    second = engine.generate_tokens([second_in], params=SamplingParams(max_new_tokens=3), seed=2)
    assert second_in[: len(first_in)] == first_in and len(second.token_ids[0]) >= 1
