"""PPO's critic on the Ray runtime: a DeepSpeed learner rank wraps the policy with the same value head as the local
runtime, so the same recipe takes the same 3 steps (policy and value losses, gradient norm, the critic's
explained variance, final weights); the head never reaches the driver's or the rollout worker's copy of the policy
(their strict weight loads would refuse its names)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.ray, pytest.mark.ray_beside, pytest.mark.slow]

from safetensors.torch import load_file  # noqa: E402

from align import api  # noqa: E402
from align.trainers.metrics import read_metrics  # noqa: E402

from .test_runtime_parity import recipe  # noqa: E402

COMPARED = ("loss", "pg_loss", "vf_loss", "grad_norm", "value/explained_variance", "value/old_mean",
            "value/clip_frac", "advantage/abs_mean", "kl_reward_penalty")


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _train(tmp_path: Path, backend: str) -> tuple[list[dict], dict, dict]:
    config = recipe(tmp_path, "ppo", backend)
    config["learner"]["value_lr"] = 1e-2
    result = api.train(config, progress=False, log=lambda _: None)
    checkpoint = result.run_dir / "checkpoints" / "step-00000003" / "learner"
    return (read_metrics(result.run_dir), load_file(str(result.run_dir / "final" / "model.safetensors")),
            {"checkpoint": checkpoint})


def test_ppo_on_ray_takes_the_same_steps_as_local(tmp_path: Path) -> None:
    (rows_local, final_local, _), (rows_ray, final_ray, saved) = (_train(tmp_path, "local"), _train(tmp_path, "ray"))
    assert [r["step"] for r in rows_local] == [r["step"] for r in rows_ray] == [0, 1, 2, 3]
    for x, y in zip(rows_local[1:], rows_ray[1:], strict=True):
        for key in COMPARED:
            assert key in x and key in y, (x["step"], key)
            assert abs(x[key] - y[key]) <= 1e-5, (x["step"], key, x[key], y[key])
    assert rows_ray[-1]["vf_loss"] > 0
    assert final_local.keys() == final_ray.keys() and not any("value_head" in k for k in final_ray)
    for name, value in final_local.items():
        torch.testing.assert_close(value, final_ray[name], rtol=0, atol=1e-5)
    assert any(saved["checkpoint"].rglob("*")), "the DeepSpeed checkpoint (with the value head) was written"
