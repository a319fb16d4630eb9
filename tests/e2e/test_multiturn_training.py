"""Multi-turn training end to end on the local runtime: episodes of several turns with observations, per-turn
credit, the learner scoring exactly the sampled tokens; and the shipped calculator recipe runs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from align import api
from align.envs import StepResult, environment
from align.trainers.metrics import read_metrics
from align.trainers.samples import read_samples

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@environment("e2e_three_turns")
class ThreeTurns:
    """Always answers ``<ok>`` and ends after three model turns; a turn holding a digit earns 0.1, one without -0.1
    (so the turns of a row, and the rows of a group, get different rewards)."""

    def reset(self, prompt: str, columns: Mapping[str, Any]) -> None:
        self.turns = 0

    def step(self, action: str) -> StepResult:
        self.turns += 1
        reward = 0.1 if any(c.isdigit() for c in action) else -0.1
        return StepResult(observation="<ok>", reward=reward, done=self.turns == 3)


def _recipe(tmp_path: Path) -> dict[str, Any]:
    return {
        "name": "multiturn_e2e", "seed": 0,
        "model": {"path": "tiny", "sft_warmup": None, "cache_dir": str(tmp_path / "cache"),
                  "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
        "data": {"task": "arithmetic", "task_options": {"digits": 1}, "eval_size": 10, "train_size": 90},
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 4,
                    "environment": {"name": "e2e_three_turns", "max_turns": 4, "max_total_tokens": 40}},
        "algorithm": {"preset": "grpo", "overrides": {"advantage": "dense_group", "kl": None, "kl_coef": 0.0}},
        "credit": {"name": "turn_rewards"},
        "rewards": [{"name": "exact_match", "options": {"extract": "full"}}],
        "learner": {"lr": 1e-3, "steps": 3, "micro_batch_size": 8},
        "runtime": {"threads": 1},
        "logging": {"eval_every": 100, "progress": False, "tensorboard": False, "dir": str(tmp_path),
                    "sample_every": 1, "credit_diagnostics": []},
        "checkpoint": {"every": 100},
    }


def test_a_multi_turn_run_trains_on_the_model_tokens_of_whole_episodes(tmp_path: Path) -> None:
    result = api.train(_recipe(tmp_path), progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    last = rows[-1]
    assert last["multiturn/turns_mean"] == 3.0 and last["multiturn/tool_calls_mean"] == 2.0
    assert 0.2 < last["multiturn/observation_tokens_frac"] < 0.8  # two "<ok>" (4 tokens each) per episode
    assert "reward/environment/mean" in last and "reward/exact_match/mean" in last
    # the learner, over prompt + turns + observations, gives the engine's log-probs at every model token
    assert all(r["logprob_gap/rollout_vs_learner"] < 1e-4 for r in rows if "logprob_gap/rollout_vs_learner" in r)
    samples = read_samples(result.run_dir)
    assert samples and all(s["transcript"].count("<ok>") == 2 for s in samples)
    first = samples[0]  # token_ids and credit are the model's own tokens: no observation character among them
    assert len(first["token_ids"]) == len(first["credit"]["advantage"]) and "<ok>" not in "".join(first["tokens"])


def test_the_shipped_calculator_recipe_runs(tmp_path: Path) -> None:
    """Two steps of recipes/multiturn_calculator_tiny_arithmetic.yaml on an untrained model of its size (no SFT)."""
    result = api.train(ROOT / "recipes" / "multiturn_calculator_tiny_arithmetic.yaml", f"logging.dir={tmp_path}",
                       f"model.cache_dir={tmp_path / 'cache'}", "model.sft_warmup=null", "learner.steps=2",
                       "rollout.prompts_per_step=4", "data.eval_size=20", "logging.eval_every=100",
                       "logging.tensorboard=false", "checkpoint.every=100", "runtime.threads=1", progress=False,
                       log=lambda _: None)
    last = read_metrics(result.run_dir)[-1]
    assert 1.0 <= last["multiturn/turns_mean"] <= 3.0 and "multiturn/tool_calls_mean" in last
    saved = json.loads((result.run_dir / "summary.json").read_text())
    assert saved["multiturn/truncated_frac"] >= 0.0
