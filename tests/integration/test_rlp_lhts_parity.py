"""RLP's credit (its ``policy`` scorer served by the learner ranks, its ``base`` scorer by an actor) and long-horizon
temperature resampling take the same steps on ``backend: local`` and ``backend: ray``."""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.ray, pytest.mark.ray_beside, pytest.mark.slow]

from align import api  # noqa: E402
from align.trainers.metrics import read_metrics  # noqa: E402

from .test_runtime_parity import _assert_same, recipe  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _train(tmp_path: Path, backend: str) -> tuple[list[dict], dict]:
    from safetensors.torch import load_file

    data = recipe(tmp_path, "rloo", backend)
    data["name"] = f"parity_rlp_lhts_{backend}"
    data["algorithm"] = {"preset": "rloo", "overrides": {"kl": None, "kl_coef": 0.0, "reducer": "seq_mean_token_mean"}}
    data["credit"] = {"name": "rlp_information_gain"}  # policy_model: policy, baseline_model: base
    data["rollout"] = {**data["rollout"], "long_horizon_temperature": 0.5, "long_horizon_candidates": 2}
    result = api.train(data, progress=False, log=lambda _: None)
    return read_metrics(result.run_dir), load_file(str(result.run_dir / "final" / "model.safetensors"))


def test_rlp_with_long_horizon_sampling_is_the_same_on_both_runtimes(tmp_path: Path) -> None:
    local, on_ray = _train(tmp_path, "local"), _train(tmp_path, "ray")
    _assert_same(local, on_ray)
    for key in ("lhts/ess", "lhts/unique_frac", "advantage/abs_mean"):
        assert all(abs(a[key] - b[key]) <= 1e-6 for a, b in zip(local[0][1:], on_ray[0][1:], strict=True)), key
