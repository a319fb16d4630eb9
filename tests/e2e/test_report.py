"""`align report`: a self-contained page with curves and per-token credit, checked in a real headless Chromium;
tracking backends (wandb offline, MLflow file store) record the same metrics."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align import api
from align.cli import app
from align.report import build_report, credit_colour
from align.trainers.samples import read_samples

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("ALIGN_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow


def tiny_run(tmp_path: Path, name: str, preset: str, **logging: object) -> Path:
    recipe = json.loads((ROOT / "tests" / "e2e" / "tiny_recipe.json").read_text())
    recipe["name"] = name
    recipe["algorithm"] = {"preset": preset}
    recipe["model"]["cache_dir"] = str(tmp_path / "cache")
    recipe["learner"]["steps"] = 4
    recipe["logging"].update({"dir": str(tmp_path / "runs"), "eval_every": 2, **logging})
    return api.train(recipe, progress=False, log=lambda _: None).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("report")
    return [tiny_run(tmp, "grpo_run", "grpo"), tiny_run(tmp, "gtpo_run", "gtpo")]


def test_runs_record_bounded_token_samples(runs: list[Path], tmp_path: Path) -> None:
    samples = read_samples(runs[0])
    assert {s["step"] for s in samples} == {1, 2, 4}
    first = samples[0]
    assert len(first["tokens"]) == len(first["token_ids"]) == len(first["credit"]["advantage"])
    assert {"advantage", "uniform", "last_token", "discounted", "gtpo_conflict"} <= set(first["credit"])
    per_step = sum(len(json.dumps(s)) + 1 for s in samples if s["step"] == 1)
    cap = 1.5 * per_step  # room for the first step's samples, not the second's
    small = tiny_run(tmp_path, "bounded", "grpo", samples_max_mb=cap / 2**20)
    assert (small / "samples.jsonl").stat().st_size <= cap
    assert {s["step"] for s in read_samples(small)} == {1}


def test_report_html_is_self_contained(runs: list[Path], tmp_path: Path) -> None:
    page = build_report(runs)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("<svg") >= 5 and "polyline" in page
    assert page.count('class="tok"') >= 8 and "data-credit" in page
    assert credit_colour(1.0, 1.0) == "rgb(255,64,64)" and credit_colour(0.0, 1.0) == "rgb(255,255,255)"
    out = CliRunner().invoke(app, ["report", *map(str, runs), "-o", str(tmp_path / "r.html")])
    assert out.exit_code == 0 and (tmp_path / "r.html").is_file()
    bad = CliRunner().invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "x.html")])
    assert bad.exit_code == 2 and "not a run directory" in bad.output


def test_report_in_a_real_browser(runs: list[Path], tmp_path: Path) -> None:
    if CHROMIUM is None:
        message = "Chromium is missing: apt-get install -y chromium (the CI script installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    page_path = tmp_path / "report.html"
    page_path.write_text(build_report(runs))
    errors: list[str] = []
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1300, "height": 1600})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(page_path.as_uri())
        assert page.locator("svg.chart").count() >= 5
        assert page.locator("svg.chart polyline").count() >= 10  # two runs per chart
        tokens = page.locator("details[open] span.tok")
        assert tokens.count() >= 4
        assert "rgb(" in tokens.first.get_attribute("style")
        assert tokens.first.get_attribute("title").startswith("advantage: ")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_tracking_backends_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tiny_run(tmp_path, "tracked", "dapo", backends=["wandb", "mlflow"])
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    import mlflow

    mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["align"], output_format="list")
    assert runs and "reward.total.mean" in runs[0].data.metrics
