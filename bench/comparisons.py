"""The published directions docs/comparisons.md checks, from one `align sweep` directory over recipes/compare/.

    align sweep recipes/compare/grpo_arithmetic.yaml recipes/compare/dr_grpo_arithmetic.yaml \
        recipes/compare/gtpo_arithmetic.yaml --seeds 0-4 --parallel 2 --out runs/compare-arithmetic
    python bench/comparisons.py runs/compare-arithmetic --json docs/bench-results/comparisons.json

`align report` gives each metric's final value per method; a per-step metric such as the length of the wrong
answers is one step's sample, so this script averages windows of steps per run (first and last `--window` steps)
and compares each method with GRPO seed by seed (the arms share each seed's base model and data order, so the
difference is paired). Every interval is the Student-t 95% interval over seeds (align.stats.mean_interval).

- Dr. GRPO (arXiv 2503.20783, §3.1 and Fig. 5): GRPO's 1/|o_i| lets wrong answers grow longer than under Dr. GRPO.
  Measured: the mean length of incorrect samples in the last window, and its change from the first window.
- GTPO (arXiv 2508.03772, abstract): GTPO keeps the policy's entropy stable where GRPO's drifts.
  Measured: the entropy's change from the first to the last window, and its step-to-step spread (standard
  deviation of the per-step entropy over the last half of the run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.manifest import load_manifest
from align.stats import Interval, mean_interval
from align.trainers.metrics import read_metrics

BASELINE = "grpo_arithmetic"
WRONG_LENGTH = "response_length/incorrect_mean"


def window_mean(rows: list[dict[str, Any]], key: str, first: int, last: int) -> float:
    """Mean of ``key`` over steps first..last (inclusive) where it was logged; NaN when it never was."""
    values = [float(r[key]) for r in rows if first <= r["step"] <= last and isinstance(r.get(key), (int, float))
              and math.isfinite(float(r[key]))]
    return statistics.fmean(values) if values else math.nan


def run_figures(rows: list[dict[str, Any]], window: int) -> dict[str, float]:
    steps = max(r["step"] for r in rows)
    early, late = (1, window), (steps - window + 1, steps)
    half = [float(r["entropy"]) for r in rows if r["step"] > steps // 2 and isinstance(r.get("entropy"), (int, float))]
    evals = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    return {
        "wrong_length_early": window_mean(rows, WRONG_LENGTH, *early),
        "wrong_length_late": window_mean(rows, WRONG_LENGTH, *late),
        "right_length_late": window_mean(rows, "response_length/correct_mean", *late),
        "entropy_early": window_mean(rows, "entropy", *early),
        "entropy_late": window_mean(rows, "entropy", *late),
        "entropy_spread_late_half": statistics.stdev(half) if len(half) > 1 else math.nan,
        "train_accuracy_late": window_mean(rows, "accuracy", *late),
        "eval_accuracy_before": float(evals[0]["eval/accuracy"]) if evals else math.nan,
        "eval_accuracy_final": float(evals[-1]["eval/accuracy"]) if evals else math.nan,
        "steps": float(steps),
    }


def interval_json(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return {"n": len(finite), "values": values}
    iv: Interval = mean_interval(finite)
    return {"n": len(finite), "mean": iv.mean, "half_width": iv.half_width, "low": iv.low, "high": iv.high,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--window", type=int, default=50, help="steps averaged at the start and at the end")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    manifest = load_manifest(args.sweep)
    per_method: dict[str, dict[int, dict[str, float]]] = {}
    for record in manifest.runs.values():
        run_dir = manifest.run_dir(record)
        if record.status not in ("done", "skipped") or run_dir is None:
            continue
        rows = read_metrics(run_dir)
        per_method.setdefault(record.method, {})[int(record.seed)] = run_figures(rows, args.window)

    keys = list(next(iter(next(iter(per_method.values())).values())).keys())
    out: dict[str, Any] = {"window": args.window, "methods": {}, "paired_vs_grpo": {}}
    for method, seeds in sorted(per_method.items()):
        out["methods"][method] = {"seeds": sorted(seeds), **{
            k: interval_json([seeds[s][k] for s in sorted(seeds)]) for k in keys}}
    base = per_method.get(BASELINE, {})
    for method, seeds in sorted(per_method.items()):
        if method == BASELINE:
            continue
        common = sorted(set(seeds) & set(base))
        out["paired_vs_grpo"][method] = {"seeds": common, **{
            k: interval_json([seeds[s][k] - base[s][k] for s in common]) for k in keys}}
        for k in ("wrong_length_late", "entropy_late"):  # the change over training, minus GRPO's change
            early = k.replace("late", "early")
            out["paired_vs_grpo"][method][f"{k}_minus_early"] = interval_json(
                [(seeds[s][k] - seeds[s][early]) - (base[s][k] - base[s][early]) for s in common])

    def fmt(entry: dict[str, Any]) -> str:
        if "mean" not in entry:
            return ", ".join(f"{v:.3f}" for v in entry["values"])
        return f"{entry['mean']:.3f} ± {entry['half_width']:.3f}"

    for method, figures in out["methods"].items():
        print(method, {k: fmt(v) for k, v in figures.items() if k != "seeds"})
    for method, figures in out["paired_vs_grpo"].items():
        print(f"{method} - {BASELINE}", {k: fmt(v) for k, v in figures.items() if k != "seeds"})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
