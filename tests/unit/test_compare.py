"""`align report` across seeds: runs grouped by method, final values as a mean with a 95% Student-t interval
(hand-computed here), mean curves with a band, the terminal table and the --json numbers; sweep directories stand
for their finished runs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from align.cli import app
from align.compare import format_seeds, group_by_method
from align.manifest import Manifest, RunRecord
from align.report import load_runs, make_report

T975_2 = 4.302652729749464  # t(0.975, 2): three seeds
T975_1 = 12.706204736174698  # t(0.975, 1): two seeds


def fake_run(root: Path, name: str, accuracy: list[float], *, seed: int = 0, lr: float = 1e-3,
             recipe_name: str = "grpo_tiny", entropy: float | None = None) -> Path:
    """A run directory with held-out accuracy at steps 0, 2, 4 and entropy at steps 1-4."""
    run = root / name
    run.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    for step in range(5):
        row: dict[str, Any] = {"step": step}
        if step % 2 == 0:
            row["eval/accuracy"] = accuracy[step // 2]
        if step and entropy is not None:
            row["entropy"] = entropy + step
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": recipe_name, "seed": seed, "learner": {"lr": lr, "steps": 4},
              "logging": {"dir": str(root)}, "algorithm": {"preset": "grpo"}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "summary.json").write_text(json.dumps({"eval/accuracy_before": accuracy[0],
                                                  "eval/accuracy_after": accuracy[-1]}))
    return run


@pytest.fixture
def seeds_and_lrs(tmp_path: Path) -> list[Path]:
    """Three seeds at lr 1e-3 (final accuracy 0.5, 0.7, 0.6) and two at lr 3e-3 (final 0.2, 0.4)."""
    return [fake_run(tmp_path, "a0", [0.1, 0.3, 0.5], seed=0, entropy=1.0),
            fake_run(tmp_path, "a1", [0.1, 0.4, 0.7], seed=1, entropy=2.0),
            fake_run(tmp_path, "a2", [0.2, 0.4, 0.6], seed=2, entropy=3.0),
            fake_run(tmp_path, "b0", [0.1, 0.1, 0.2], seed=0, lr=3e-3),
            fake_run(tmp_path, "b1", [0.1, 0.2, 0.4], seed=1, lr=3e-3)]


def test_runs_differing_only_in_seed_pool_and_others_are_told_apart(seeds_and_lrs: list[Path]) -> None:
    groups = group_by_method(load_runs(seeds_and_lrs))
    assert {label: [r["name"] for r in runs] for label, runs in groups.items()} == {
        "grpo_tiny learner.lr=0.001": ["a0", "a1", "a2"], "grpo_tiny learner.lr=0.003": ["b0", "b1"]}


def test_final_values_mean_and_t_interval_by_hand(seeds_and_lrs: list[Path]) -> None:
    report = make_report(seeds_and_lrs, ["entropy"], warn=lambda _: None)
    assert report.metrics == ["eval/accuracy", "entropy"]
    first, second = report.methods
    # lr 1e-3: final accuracy 0.5, 0.7, 0.6 -> mean 0.6, s = 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3)
    acc = first.intervals["eval/accuracy"]
    assert acc is not None and acc.n == 3
    assert acc.mean == pytest.approx(0.6, abs=1e-12) and acc.std == pytest.approx(0.1, abs=1e-12)
    assert acc.half_width == pytest.approx(T975_2 * 0.1 / math.sqrt(3), rel=1e-9)
    # entropy at the last step (4): 5, 6, 7 -> mean 6, s = 1
    ent = first.intervals["entropy"]
    assert ent is not None and ent.mean == pytest.approx(6.0) and ent.half_width == pytest.approx(T975_2 / math.sqrt(3))
    # lr 3e-3: 0.2, 0.4 -> mean 0.3, s = 0.1 * sqrt(2), half-width t(0.975, 1) * s / sqrt(2) = 12.706 * 0.1
    acc2 = second.intervals["eval/accuracy"]
    assert acc2 is not None and acc2.mean == pytest.approx(0.3) and acc2.half_width == pytest.approx(T975_1 * 0.1)
    assert second.intervals["entropy"] is None  # not logged by these runs: shown as "-"
    numbers = report.numbers()
    assert "Student t" in numbers["interval"] and numbers["confidence"] == 0.95
    row = numbers["methods"][0]
    assert row["method"] == "grpo_tiny learner.lr=0.001" and row["seeds"] == [0, 1, 2]
    assert row["final"]["eval/accuracy"]["values"] == [0.5, 0.7, 0.6]
    assert row["final"]["eval/accuracy"]["steps"] == [4, 4, 4]
    assert row["final"]["eval/accuracy"]["low"] == pytest.approx(0.6 - T975_2 * 0.1 / math.sqrt(3), rel=1e-9)
    assert numbers["methods"][1]["final"]["entropy"] == {"n": 0, "values": [], "steps": []}


def test_pooled_page_draws_mean_curves_with_bands(seeds_and_lrs: list[Path]) -> None:
    page = make_report(seeds_and_lrs, warn=lambda _: None).page
    assert "Student t" in page and "(mean, 95% band)" in page
    charts = {re.search(r'aria-label="([^"]*)"', svg).group(1): svg for svg in page.split("<svg")[1:]}
    accuracy, entropy = charts["Held-out accuracy (mean, 95% band)"], charts["Entropy (mean, 95% band)"]
    assert accuracy.count('<polygon class="band"') == 2 and accuracy.count("<polyline") == 2  # one per method
    assert entropy.count('<polygon class="band"') == 1  # only the first method logs entropy
    assert "60.0% ± 24.8 [35.2%, 84.8%]" in page  # 0.6 ± 4.3027 * 0.1 / sqrt(3)
    assert "http://" not in page and "<script" not in page


def test_runs_of_different_recipes_keep_one_curve_each(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "x", [0.1, 0.2, 0.3], recipe_name="x"),
            fake_run(tmp_path, "y", [0.1, 0.2, 0.4], recipe_name="y")]
    report = make_report(runs, warn=lambda _: None)
    assert [m.method for m in report.methods] == ["x", "y"]
    assert "<polygon" not in report.page and report.page.count("<polyline") == 2
    assert "30.0% (one run)" in report.page


def write_sweep(root: Path) -> Path:
    """A sweep directory: two finished seeds of one method, one failed run."""
    fake_run(root, "m-seed0-20260101-000000", [0.0, 0.2, 0.4], seed=0, recipe_name="m-seed0")
    fake_run(root, "m-seed1-20260101-000001", [0.0, 0.2, 0.8], seed=1, recipe_name="m-seed1")
    manifest = Manifest(root)
    for seed, status, error in ((0, "done", None), (1, "skipped", None), (2, "failed", "it broke")):
        run_id = f"m-seed{seed}"
        manifest.runs[run_id] = RunRecord(
            id=run_id, recipe="/r/m.yaml", method="m learner.lr=0.001", overrides=["learner.lr=0.001"],
            seed=seed, status=status, error=error, dir=f"{run_id}-20260101-00000{seed}" if error is None else None)
    manifest.save()
    return root


def test_a_sweep_directory_stands_for_its_finished_runs(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "sweep")
    warnings: list[str] = []
    runs = load_runs([sweep], warnings.append)
    assert [(r["name"], r["method"], r["seed"]) for r in runs] == [
        ("m-seed0-20260101-000000", "m learner.lr=0.001", 0), ("m-seed1-20260101-000001", "m learner.lr=0.001", 1)]
    assert warnings == [f"{sweep}: run m-seed2 is left out (it failed; sweep.json holds its error)"]
    # a run directory of the sweep given on its own keeps its method; given twice, it is read once
    alone = load_runs([sweep / "m-seed1-20260101-000001", sweep], lambda _: None)
    assert [(r["name"], r["method"]) for r in alone] == [("m-seed1-20260101-000001", "m learner.lr=0.001"),
                                                         ("m-seed0-20260101-000000", "m learner.lr=0.001")]
    shutil.rmtree(sweep / "m-seed0-20260101-000000")  # deleted by hand: left out, the rest is reported
    warnings.clear()
    assert [r["seed"] for r in load_runs([sweep], warnings.append)] == [1]
    assert warnings[0] == f"{sweep}: run m-seed0 is left out (its directory m-seed0-20260101-000000 is gone)"


def test_cli_prints_the_table_and_writes_the_numbers(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "sweep")
    out, numbers = tmp_path / "r.html", tmp_path / "numbers" / "n.json"
    result = CliRunner().invoke(app, ["report", str(sweep), "-o", str(out), "--metric", "entropy", "--json",
                                      str(numbers)])
    assert result.exit_code == 2 and "--metric 'entropy': no run logged it" in result.output  # these runs do not
    result = CliRunner().invoke(app, ["report", str(sweep), "-o", str(out), "--json", str(numbers)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    # 0.4 and 0.8: mean 0.6, s = 0.2 sqrt(2), half-width 12.706 * 0.2 = 2.541 -> 254.1 points
    assert re.split(r"\s{2,}", lines[header + 1]) == ["m learner.lr=0.001", "2", "0-1",
                                                      "60.0% ± 254.1 [-194.1%, 314.1%]"]
    assert "Student t over the seeds" in lines[header + 2]
    data = json.loads(numbers.read_text())
    assert data["methods"][0]["final"]["eval/accuracy"]["half_width"] == pytest.approx(T975_1 * 0.2, rel=1e-9)
    assert out.is_file()


def test_a_sweep_without_finished_runs_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    manifest = Manifest(root)
    manifest.runs["m-seed0"] = RunRecord("m-seed0", "/r/m.yaml", "m", [], 0, "failed", "it broke")
    manifest.save()
    result = CliRunner().invoke(app, ["report", str(root), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "the sweep has no finished run yet" in result.output
    (root / "sweep.json").write_text('{"runs": [{"id": 1}]}')
    result = CliRunner().invoke(app, ["report", str(root), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "not a readable sweep manifest" in result.output


def test_seed_lists_read_as_ranges() -> None:
    assert format_seeds([0, 1, 2, 4, 6, 7]) == "0-2,4,6-7"
    assert format_seeds([3, None]) == "3,?"
