"""PPO's critic in real runs on the tiny offline model: its value head is saved in checkpoints and restored on resume,
stays trainable under LoRA, and never reaches the final model; the RTO recipe trains."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align import api
from align.trainers.metrics import TIMING_PREFIXES, read_metrics

from .test_training import tiny_recipe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _train(recipe: dict, **kw):
    return api.train(recipe, progress=False, log=lambda _: None, **kw)


def _ppo(tmp_path: Path, name: str, **sections) -> dict:
    defaults = {"algorithm": {"preset": "ppo"}, "learner": {"lr": 1e-3, "steps": 4, "micro_batch_size": 16,
                                                            "value_lr": 1e-2},
                "checkpoint": {"every": 2, "keep": 2},
                "logging": {"dir": str(tmp_path / "runs"), "tensorboard": False, "eval_every": 100}}
    return tiny_recipe(tmp_path, name=name, **{**defaults, **sections})


def test_resume_restores_the_value_head_and_continues_exactly(tmp_path: Path) -> None:
    """Train 4 steps (checkpoints at 2 and 4); then, in a copy of the run cut back to its step-2 checkpoint, resume:
    steps 3 and 4 must equal the uninterrupted run's. A value head restarted from zero would change the value
    loss, its gradient on the shared trunk and the advantages (V_old), so every metric of step 3 would differ."""
    reference = _train(_ppo(tmp_path, "ppo_resume"))
    head = load_file(str(reference.run_dir / "checkpoints" / "step-00000002" / "learner" / "model.safetensors"))
    assert head["value_head.weight"].abs().sum() > 0  # trained away from its zero start, and saved
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(reference.run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000004")
    (copy / "checkpoints" / "latest").write_text("step-00000002\n")
    resumed = _train(_ppo(tmp_path, "ppo_resume"), resume=copy)
    assert resumed.run_dir == copy

    def steps(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in read_metrics(run)
                if r["step"] > 2]

    got, expected = steps(copy), steps(reference.run_dir)
    assert [r["step"] for r in got] == [3, 4] and "value/explained_variance" in got[0]
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    final = load_file(str(copy / "checkpoints" / "step-00000004" / "learner" / "model.safetensors"))
    again = load_file(str(reference.run_dir / "checkpoints" / "step-00000004" / "learner" / "model.safetensors"))
    torch.testing.assert_close(final["value_head.weight"], again["value_head.weight"], rtol=0, atol=1e-6)


def test_value_head_trains_under_lora_and_stays_out_of_the_adapter(tmp_path: Path) -> None:
    recipe = _ppo(tmp_path, "ppo_lora", lora={"enabled": True, "r": 4, "alpha": 8,
                                             "target_modules": ["q_proj", "v_proj"]})
    result = _train(recipe)
    saved = load_file(str(result.run_dir / "checkpoints" / "step-00000004" / "learner" / "model.safetensors"))
    assert saved["value_head.weight"].abs().sum() > 0 and saved["value_head.bias"].abs().sum() > 0
    assert any("lora_A" in k for k in saved)
    assert not any("lora" not in k and not k.startswith("value_head.") for k in saved)  # the base stays frozen
    adapter = load_file(str(result.run_dir / "final" / "adapter_model.safetensors"))
    assert adapter and not any("value_head" in k for k in adapter)
    rows = read_metrics(result.run_dir)
    assert rows[-1]["vf_loss"] > 0 and rows[-1]["kl_reward_penalty"] != 0  # the reference: adapters disabled


def test_final_model_of_a_ppo_run_is_the_policy_alone(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = _train(_ppo(tmp_path, "ppo_final", learner={"lr": 1e-3, "steps": 2, "micro_batch_size": 16}))
    weights = load_file(str(result.run_dir / "final" / "model.safetensors"))
    assert not any("value_head" in k for k in weights)
    AutoModelForCausalLM.from_pretrained(result.run_dir / "final")  # a plain causal LM


def test_rto_recipe_trains(tmp_path: Path) -> None:
    """recipes/rto_tiny_arithmetic.yaml with its DPO model = the base (zero implicit reward): a few steps run, the
    credit module's token rewards reach the samples, the critic trains."""
    result = api.train(ROOT / "recipes" / "rto_tiny_arithmetic.yaml", f"logging.dir={tmp_path}",
                       "logging.tensorboard=false", "learner.steps=3", "logging.eval_every=100",
                       "checkpoint.every=100", "runtime.threads=1", progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["vf_loss"] > 0 and r["kl_reward_penalty"] != 0 for r in rows[1:])
