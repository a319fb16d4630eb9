"""User rewards arrive through plugin modules and through the ``align.rewards`` entry-point group."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import rewards
from align.errors import InputError
from rewards import RewardBatch, RewardComposer


def write_module(directory: Path, name: str, reward_name: str, value: float) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(f"""
        import rewards

        @rewards.reward({reward_name!r})
        def custom(completion: str) -> float:
            return {value} * len(completion)
    """))


def test_plugin_module_registers_a_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "my_team_rewards", "team_length", 2.0)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.load_plugins(["my_team_rewards"]) == ["my_team_rewards"]
    batch = RewardBatch(prompts=["q"], completions=["abc"], completion_ids=[[1, 2, 3]])
    assert RewardComposer(["team_length"]).score(batch).total.item() == 6.0


def test_missing_plugin_is_a_one_line_error() -> None:
    with pytest.raises(InputError, match="plugin 'no_such_plugin_mod' could not be imported") as err:
        rewards.load_plugins(["no_such_plugin_mod"])
    assert "\n" not in str(err.value)


def test_entry_point_group_registers_a_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "installed_rewards_pkg", "installed_length", 3.0)
    dist = tmp_path / "installed_rewards_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: installed-rewards-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[align.rewards]\ninstalled = installed_rewards_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "installed" in rewards.load_entry_points()
    assert "installed_length" in rewards.REWARDS
    assert rewards.load_entry_points() == []  # loaded once per process
