"""`align sweep` end to end on an embedded Ray (2 CPUs): each run trains in a Ray worker process of its own; a run
whose process dies mid-training leaves the other running and is reported in one line (exit code 1); the manifest
lists both; the same sweep again skips the finished run; `align report` over the sweep directory compares the
methods. (A run that fails with an error rather than a crash: tests/unit/test_sweep.py, train_job.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def recipes(tmp_path: Path) -> tuple[Path, Path]:
    """``good``: the tiny recipe; ``broken``: the same with a plugin reward that ends its process (as a segfault or
    the OOM killer would) at step 1, after validation has passed."""
    base = json.loads((ROOT / "tests" / "e2e" / "tiny_recipe.json").read_text())
    good, broken = tmp_path / "good.json", tmp_path / "broken.json"
    good.write_text(json.dumps({**base, "name": "good"}))
    broken.write_text(json.dumps({**base, "name": "broken", "plugins": ["sweep_crashing_reward"],
                                  "rewards": [{"name": "kills_its_process"}]}))
    return good, broken


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_sweep_on_embedded_ray_keeps_going_past_a_failure_and_skips_finished_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "sweep_crashing_reward.py").write_text(textwrap.dedent("""
        import os

        import rewards

        @rewards.reward("kills_its_process")
        def kills_its_process(completion: str) -> float:
            os._exit(3)
    """))
    monkeypatch.syspath_prepend(str(plugins))  # the driver validates; the Ray workers get PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])))
    ray_tmp = Path("/tmp") / f"rsw{os.getpid()}"  # short: Ray's socket paths must fit in 107 characters
    monkeypatch.setenv("ALIGN_RAY_TMP", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    good, broken = recipes(tmp_path)
    out = tmp_path / "sweep"
    common = ["--set", "learner.steps=2", "--set", f"model.cache_dir={tmp_path / 'cache'}", "--out", str(out)]
    try:
        first = CliRunner().invoke(app, ["sweep", str(good), str(broken), "--parallel", "2", *common])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert first.exit_code == 1, first.output
    failures = [line for line in first.output.splitlines() if line.startswith("failed:")]
    assert len(failures) == 1, first.output
    assert failures[0].startswith("failed: broken-seed0: the Ray task ended without a result (WorkerCrashedError: ")
    assert failures[0].endswith(f"; see {out / 'logs' / 'broken-seed0.log'}")
    manifest = load_manifest(out)
    done, failed = manifest.runs["good-seed0"], manifest.runs["broken-seed0"]
    assert (done.status, failed.status) == ("done", "failed")
    assert failed.error is not None and failures[0].endswith(failed.error)
    assert failed.dir is not None and (out / failed.dir / "recipe.yaml").is_file()  # it died after step 0
    run_dir = out / str(done.dir)
    assert re.fullmatch(r"good-seed0-\d{8}-\d{6}", run_dir.name)
    assert (run_dir / "summary.json").is_file() and (run_dir / "final" / "model.safetensors").is_file()
    assert done.final["eval/accuracy_after"] == json.loads((run_dir / "summary.json").read_text())[
        "eval/accuracy_after"]
    pid = re.search(r"pid (\d+):", (out / "logs" / "good-seed0.log").read_text())
    assert pid is not None and int(pid.group(1)) != os.getpid()  # trained in a Ray worker, not in this process
    table = first.stdout.splitlines()
    assert any(re.match(r"good-seed0\s+0\s+done\s+\d+\.\d% -> \d+\.\d%$", line) for line in table), first.stdout
    assert any(re.match(r"broken-seed0\s+0\s+failed\s+-$", line) for line in table), first.stdout

    before = snapshot(run_dir)
    again = CliRunner().invoke(app, ["sweep", str(good), *common])  # no run left: no Ray is started
    assert again.exit_code == 0, again.output
    assert "1 of 1 runs finished earlier: skipped" in again.stdout and "running" not in again.stdout
    assert snapshot(run_dir) == before
    manifest = load_manifest(out)
    assert manifest.runs["good-seed0"].status == "skipped" and manifest.runs["broken-seed0"].status == "failed"

    numbers = tmp_path / "numbers.json"
    report = CliRunner().invoke(app, ["report", str(out), "-o", str(tmp_path / "r.html"), "--metric", "entropy",
                                      "--json", str(numbers)])
    assert report.exit_code == 0, report.output
    assert "run broken-seed0 is left out" in report.stderr
    (method,) = json.loads(numbers.read_text())["methods"]
    assert method["method"] == "good" and method["n_runs"] == 1
    assert method["final"]["eval/accuracy"]["mean"] == done.final["eval/accuracy_after"]
