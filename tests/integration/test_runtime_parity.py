"""One loop, two runtimes: the same recipe on ``backend: local`` and on ``backend: ray`` (transformers engine) gives
the same loss, gradient norm and weights after 3 steps, for sequence- and token-level policy objectives and for
the DPO family (token-level variants with their credit modules' auxiliary models, served by actors on Ray); two
DeepSpeed learner ranks take the same steps as one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

from safetensors.torch import load_file  # noqa: E402

from align import api  # noqa: E402
from align.trainers.metrics import read_metrics  # noqa: E402

PREFERENCE = ("dpo", "tdpo", "cdpo", "tgdpo")
COMPARED = ("loss", "pg_loss", "kl", "grad_norm", "eval/preference_accuracy", "eval/loss", "response_length/mean",
            "advantage/abs_mean")


def recipe(tmp_path: Path, preset: str, backend: str, learners: int = 1) -> dict:
    return {
        "name": f"parity_{preset}_{backend}_{learners}", "seed": 0,
        "model": {"path": "tiny", "sft_warmup": None, "cache_dir": str(tmp_path / "cache"),
                  "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
        "data": {"task": "arithmetic", "task_options": {"digits": 1}, "eval_size": 8, "train_size": 64},
        "rollout": {"engine": "hf", "samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 4},
        "algorithm": {"preset": preset},
        "credit": {"cdpo": {"name": "contrastive_critical"}, "tgdpo": {"name": "implicit_dpo"}}.get(preset),
        "rewards": [] if preset in PREFERENCE else [{"name": "exact_match", "options": {"extract": "full"}},
                                               {"name": "repetition_penalty", "options": {"ngram": 1}}],
        # micro-batches smaller than the step: accumulation is part of what must agree
        "learner": {"lr": 1e-3, "steps": 3, "micro_batch_size": 8, "scheduler": "linear", "warmup_steps": 1},
        "runtime": {"backend": "local"} if backend == "local" else
                   {"backend": "ray", "learners": learners, "reward_workers": 1},
        "logging": {"dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False, "eval_every": 1},
        "checkpoint": {"every": 3},
    }


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _train(tmp_path: Path, preset: str, backend: str, learners: int = 1) -> tuple[list[dict], dict]:
    result = api.train(recipe(tmp_path, preset, backend, learners), progress=False, log=lambda _: None)
    return read_metrics(result.run_dir), load_file(str(result.run_dir / "final" / "model.safetensors"))


def _assert_same(a: tuple[list[dict], dict], b: tuple[list[dict], dict]) -> None:
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [0, 1, 2, 3]
    compared = 0
    for x, y in zip(rows_a, rows_b, strict=True):
        for key in COMPARED:
            assert (key in x) == (key in y), (x["step"], key)
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-5, (x["step"], key, x[key], y[key])
                compared += 1
    assert compared >= 9  # loss and grad_norm at least, every step
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        torch.testing.assert_close(value, weights_b[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "gspo", *PREFERENCE])
def test_local_and_ray_take_the_same_steps(tmp_path: Path, preset: str) -> None:
    local = _train(tmp_path, preset, "local")
    on_ray = _train(tmp_path, preset, "ray")
    _assert_same(local, on_ray)
    start = load_file(str(next((tmp_path / "cache" / "models").glob("tiny-*")) / "model.safetensors"))
    assert max(float((local[1][k] - start[k]).abs().max()) for k in start) > 1e-4  # the steps did something


def test_two_learner_ranks_take_the_same_steps_as_one(tmp_path: Path) -> None:
    _assert_same(_train(tmp_path, "grpo", "ray", learners=1), _train(tmp_path, "grpo", "ray", learners=2))
