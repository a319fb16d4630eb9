"""Comparing methods over seeds: runs grouped by method, each metric's final value and its curve as a mean with a
95% Student-t interval across the method's seeds (:mod:`align.stats`).

A *method* is a recipe with its overrides, seeds pooled. Runs of a sweep carry their method from the manifest
(``run["method"]``: the recipe name and the swept values). Other runs pool when their recipes are the same apart from
``seed``, ``logging`` and ``checkpoint`` (where and how often a run records itself does not change what it
trains); such a group is labelled with its recipe name, plus the keys that tell apart groups of the same name.

Works on runs as :mod:`align.report` loads them: mappings with ``name``, ``recipe``, ``metrics`` (rows of
``metrics.jsonl``) and optionally ``method`` and ``seed``.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from align.errors import InputError
from align.stats import CONFIDENCE, METHOD_NOTE, Interval, mean_interval

HELD_OUT = ("eval/accuracy", "eval/preference_accuracy")  # reported whenever a run logs them
_NOT_THE_METHOD = ("seed", "logging", "checkpoint")

Run = dict[str, Any]


@dataclass
class MethodResult:
    """One method's runs and, per metric, the final values and their mean with its interval (None: not logged)."""

    method: str
    runs: list[Run]
    finals: dict[str, list[tuple[int, float]]]  # metric -> (final step, value) of each run that logged it
    intervals: dict[str, Interval | None]

    @property
    def seeds(self) -> list[int | None]:
        return [run.get("seed") for run in self.runs]


def group_by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Method label -> its runs, in the order the methods first appear."""
    keys = [run["method"] if run.get("method") else _recipe_key(run) for run in runs]
    labels = _labels(runs, keys)
    groups: dict[str, list[Run]] = {}
    for run, key in zip(runs, keys, strict=True):
        groups.setdefault(labels[key], []).append(run)
    return groups


def _recipe_key(run: Run) -> str:
    recorded = run.get("recipe") or {}  # the run's recipe.yaml as written (a dict, not a Recipe)
    if not recorded:
        return f"run {run['name']}"  # no recipe to compare: a method of its own
    return json.dumps({k: v for k, v in recorded.items() if k not in _NOT_THE_METHOD}, sort_keys=True)


def _labels(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, str]:
    """A readable label per key: a sweep's method as it is; a recipe by its name, plus the settings in which it
    differs from other recipes of that name."""
    names: dict[str, str] = {}
    for run, key in zip(runs, keys, strict=True):
        if run.get("method"):
            names[key] = key
        elif key.startswith("run "):
            names[key] = run["name"]
        else:
            names.setdefault(key, str((run.get("recipe") or {}).get("name", "run")))
    labels = {}
    for key, name in names.items():
        rivals = [k for k, n in names.items() if n == name and not k.startswith("run ")]
        if len(rivals) < 2 or key.startswith("run ") or key == name:
            labels[key] = name
            continue
        flat = {k: _flatten(json.loads(k)) for k in rivals}
        varying = sorted({p for f in flat.values() for p in f
                          if len({json.dumps(g.get(p)) for g in flat.values()}) > 1})
        labels[key] = " ".join([name, *(f"{p}={json.dumps(flat[key].get(p))}" for p in varying)])
    return labels


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def final_value(rows: Sequence[dict[str, Any]], key: str) -> tuple[int, float] | None:
    """(step, value) of the last row that logged ``key`` as a finite number."""
    for row in reversed(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(row["step"]), float(value)
    return None


def logged_keys(runs: Iterable[Run]) -> set[str]:
    return {k for run in runs for row in run["metrics"] for k in row if k != "step"}


def choose_metrics(runs: Sequence[Run], asked: Sequence[str]) -> list[str]:
    """Held-out accuracy (whichever kinds the runs log), then the asked metrics in order. A metric no run logged is
    a one-line InputError with the nearest logged names."""
    logged = logged_keys(runs)
    for key in asked:
        if key not in logged:
            near = difflib.get_close_matches(key, sorted(logged), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; logged: {', '.join(sorted(logged)[:12])}..."
            raise InputError(f"--metric {key!r}: no run logged it{hint}")
    return list(dict.fromkeys([*(k for k in HELD_OUT if k in logged), *asked]))


def summarise(runs: Sequence[Run], metrics: Sequence[str]) -> list[MethodResult]:
    """Per method: each metric's final value in every run, and their mean with a 95% interval over the runs."""
    results = []
    for method, members in group_by_method(runs).items():
        finals: dict[str, list[tuple[int, float]]] = {}
        for key in metrics:
            finals[key] = [f for f in (final_value(run["metrics"], key) for run in members) if f is not None]
        intervals = {k: mean_interval([v for _, v in f]) if f else None for k, f in finals.items()}
        results.append(MethodResult(method, list(members), finals, intervals))
    return results


def mean_curve(runs: Sequence[Run], keys: Sequence[str]) -> list[tuple[float, Interval]]:
    """(step, mean and interval over the runs logging it there) for the first of ``keys`` the runs log."""
    key = next((k for k in keys if any(final_value(run["metrics"], k) for run in runs)), None)
    if key is None:
        return []
    by_step: dict[float, list[float]] = {}
    for run in runs:
        for row in run["metrics"]:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                by_step.setdefault(float(row["step"]), []).append(float(value))
    return [(step, mean_interval(values)) for step, values in sorted(by_step.items())]


def is_pooled(results: Sequence[MethodResult]) -> bool:
    """Whether any method holds more than one run (then curves are drawn per method, with a band)."""
    return any(len(r.runs) > 1 for r in results)


def format_value(key: str, value: float) -> str:
    return f"{100 * value:.1f}%" if "accuracy" in key else f"{value:.4g}"


def format_interval(key: str, interval: Interval | None) -> str:
    if interval is None:
        return "-"
    mean = format_value(key, interval.mean)
    if interval.half_width is None:
        return f"{mean} (one run)"
    half = f"{100 * interval.half_width:.1f}" if "accuracy" in key else f"{interval.half_width:.2g}"
    assert interval.low is not None and interval.high is not None
    return f"{mean} ± {half} [{format_value(key, interval.low)}, {format_value(key, interval.high)}]"


def format_seeds(seeds: Sequence[int | None]) -> str:
    """[0, 1, 2, 4] -> "0-2,4"; unknown seeds show as "?"."""
    known = sorted({s for s in seeds if s is not None})
    parts, i = [], 0
    while i < len(known):
        j = i
        while j + 1 < len(known) and known[j + 1] == known[j] + 1:
            j += 1
        parts.append(str(known[i]) if i == j else f"{known[i]}-{known[j]}")
        i = j + 1
    if None in seeds:
        parts.append("?")
    return ",".join(parts)


def table_lines(results: Sequence[MethodResult], metrics: Sequence[str]) -> list[str]:
    """The per-method table for the terminal, with the note saying what the interval is."""
    rows = [["method", "runs", "seeds", *(f"{m} (final)" for m in metrics)]]
    for r in results:
        rows.append([r.method, str(len(r.runs)), format_seeds(r.seeds),
                     *(format_interval(m, r.intervals[m]) for m in metrics)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return [*lines, METHOD_NOTE]


def to_json(results: Sequence[MethodResult], metrics: Sequence[str]) -> dict[str, Any]:
    """The aggregated numbers, for docs to cite: per method and metric the mean, the interval and every run's
    final value."""
    return {
        "interval": METHOD_NOTE, "confidence": CONFIDENCE, "metrics": list(metrics),
        "methods": [{
            "method": r.method, "n_runs": len(r.runs), "seeds": r.seeds,
            "runs": [{"name": run["name"], "path": str(run.get("path", "")), "seed": run.get("seed")}
                     for run in r.runs],
            "final": {m: _final_json(r.intervals[m], r.finals[m]) for m in metrics},
        } for r in results],
    }


def _final_json(interval: Interval | None, finals: list[tuple[int, float]]) -> dict[str, Any]:
    numbers: dict[str, Any] = interval.as_dict() if interval is not None else {"n": 0}
    return {**numbers, "values": [v for _, v in finals], "steps": [s for s, _ in finals]}
