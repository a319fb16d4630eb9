"""bench/comparisons.py on a hand-made sweep: window means per run, then paired differences vs GRPO over seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.manifest import Manifest, RunRecord

ROOT = Path(__file__).resolve().parents[2]


def write_run(root: Path, method: str, seed: int, wrong_length: float, entropy_drop: float) -> RunRecord:
    """A 4-step run: wrong answers 3.0 long in steps 1-2 and ``wrong_length`` in steps 3-4; entropy 1.0 then
    1.0 - ``entropy_drop``; held-out accuracy 0.5 -> 0.5 + seed / 10."""
    name = f"{method}-seed{seed}"
    run = root / f"{name}-20261203-120000"
    run.mkdir(parents=True)
    rows = [{"step": 0, "eval/accuracy": 0.5}]
    for step in (1, 2, 3, 4):
        late = step > 2
        rows.append({"step": step, "response_length/incorrect_mean": wrong_length if late else 3.0,
                     "entropy": 1.0 - entropy_drop if late else 1.0, "accuracy": 0.5})
    rows.append({"step": 4, "eval/accuracy": 0.5 + seed / 10})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return RunRecord(id=name, recipe=f"/r/{method}.yaml", method=method, overrides=[], seed=seed, status="done",
                     dir=run.name)


def test_paired_differences_over_seeds(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    # GRPO's wrong answers grow by 1.0 on seed 0 and 2.0 on seed 1; Dr. GRPO's by 0.5 and 1.0; a failed run is
    # left out
    for record in (write_run(tmp_path, "grpo_arithmetic", 0, 4.0, 0.1),
                   write_run(tmp_path, "grpo_arithmetic", 1, 5.0, 0.3),
                   write_run(tmp_path, "dr_grpo_arithmetic", 0, 3.5, 0.2),
                   write_run(tmp_path, "dr_grpo_arithmetic", 1, 4.0, 0.2)):
        manifest.runs[record.id] = record
    manifest.runs["dr_grpo_arithmetic-seed2"] = RunRecord(id="dr_grpo_arithmetic-seed2", recipe="/r/x.yaml",
                                                          method="dr_grpo_arithmetic", overrides=[], seed=2,
                                                          status="failed", error="boom")
    manifest.save()
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "comparisons.py"), str(tmp_path), "--window", "2",
                          "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    figures = json.loads(out.read_text())
    grpo = figures["methods"]["grpo_arithmetic"]
    assert grpo["seeds"] == [0, 1]
    assert grpo["wrong_length_late"]["values"] == [4.0, 5.0]
    assert grpo["wrong_length_early"]["values"] == [3.0, 3.0]
    # mean 4.5, s = 0.7071068, t(0.975, 1) = 12.7062047: half-width 12.7062047 * 0.7071068 / sqrt(2) = 6.3531024
    assert grpo["wrong_length_late"]["mean"] == pytest.approx(4.5, abs=1e-12)
    assert grpo["wrong_length_late"]["half_width"] == pytest.approx(6.3531024, abs=1e-6)
    paired = figures["paired_vs_grpo"]["dr_grpo_arithmetic"]
    assert paired["seeds"] == [0, 1]
    assert paired["wrong_length_late"]["values"] == [-0.5, -1.0]
    assert paired["wrong_length_late_minus_early"]["values"] == [-0.5, -1.0]
    assert paired["entropy_late"]["values"] == pytest.approx([-0.1, 0.1], abs=1e-12)
    assert paired["eval_accuracy_final"]["values"] == [0.0, 0.0]


def test_report_figure_keeps_the_chosen_charts_and_the_key(tmp_path: Path) -> None:
    import shutil

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("Chromium is missing: apt-get install -y chromium (the CI script installs it)")
    chart = '<svg class="chart" width="460" height="220" aria-label="{0}"><text x="5" y="15">{0}</text></svg>'
    page = tmp_path / "page.html"
    page.write_text('<html><body><div><span class="run-key">grpo (5 runs)</span></div><div class="charts">'
                    + "".join(chart.format(t) for t in ("Entropy (mean)", "Loss (mean)", "Held-out accuracy"))
                    + "</div></body></html>")
    out = tmp_path / "figure.png"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "report_figure.py"), str(page), "--chart", "Entropy",
                          "--chart", "Held-out", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("2 charts") and out.stat().st_size > 1000
    missing = subprocess.run([sys.executable, str(ROOT / "bench" / "report_figure.py"), str(page), "--chart", "Nope",
                              "-o", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no chart title starts with" in missing.stderr
