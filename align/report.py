"""``align report``: one self-contained HTML page per set of runs (no network needed to view it).

Learning curves (inline SVG) for several runs side by side, and sampled completions with each token coloured by its
credit (advantage, token reward or weight) on a diverging scale, with the value on hover. Reads ``metrics.jsonl``,
``samples.jsonl``, ``recipe.yaml`` and ``summary.json`` from each run directory; a sweep directory (``align sweep``)
stands for its finished runs.

Runs are grouped by method (:mod:`align.compare`): a table gives each method's final held-out accuracy (and any
``--metric``) as a mean with a 95% Student-t interval over its seeds. Where a method pools several runs, each chart
draws one mean curve per method with its 95% band, instead of one curve per run.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align.compare import (
    MethodResult,
    choose_metrics,
    format_interval,
    format_seeds,
    is_pooled,
    mean_curve,
    summarise,
    table_lines,
    to_json,
)
from align.errors import InputError
from align.manifest import FINISHED, RunRecord, is_sweep_dir, load_manifest
from align.stats import METHOD_NOTE
from align.trainers.jsonl import Warn, warn_on_stderr
from align.trainers.metrics import read_metrics
from align.trainers.samples import read_samples

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
CURVES: list[tuple[str, list[str]]] = [
    ("Reward", ["reward/total/mean"]),
    ("Accuracy (training samples)", ["accuracy"]),
    ("Held-out accuracy", ["eval/accuracy"]),
    ("KL to the reference", ["kl"]),
    ("Entropy", ["entropy"]),
    ("Clip fraction", ["clip_frac", "seq_clip_frac"]),
    ("Response length (mean)", ["response_length/mean"]),
    ("Throughput (tokens/s)", ["throughput/tokens_per_s"]),
    ("Preference accuracy (held-out)", ["eval/preference_accuracy"]),
    ("Loss", ["loss"]),
]


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))
            and math.isfinite(r[key])]


def _reward_curves(runs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    names = sorted({k for run in runs for row in run["metrics"] for k in row
                    if k.startswith("reward/") and k.endswith("/mean") and k != "reward/total/mean"})
    return [(f"Reward: {k.split('/')[1]}", [k]) for k in names]


Band = tuple[str, str, list[tuple[float, float, float]]]  # (label, colour, [(x, low, high), ...])


def svg_chart(title: str, lines: list[tuple[str, str, list[tuple[float, float]]]], width: int = 460,
              height: int = 220, bands: Sequence[Band] = ()) -> str:
    """An inline SVG line chart. lines: (label, colour, [(x, y), ...]); bands: shaded areas drawn beneath them."""
    points = [p for _, _, pts in lines for p in pts] + \
        [(x, y) for _, _, pts3 in bands for x, low, high in pts3 for y in (low, high)]
    left, right, top, bottom = 52, 10, 26, 30
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" class="chart-title">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>']
    for value in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{left - 4}" y="{sy(value) + 4:.1f}" class="tick" text-anchor="end">{value:.3g}</text>')
    for value in (x0, x1):
        parts.append(f'<text x="{sx(value):.1f}" y="{height - bottom + 14}" class="tick" '
                     f'text-anchor="middle">{value:.0f}</text>')
    for label, colour, band in bands:
        if len(band) < 2:
            continue
        outline = [(x, high) for x, _, high in band] + [(x, low) for x, low, _ in reversed(band)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in outline)
        parts.append(f'<polygon class="band" points="{path}" fill="{colour}" fill-opacity="0.18" stroke="none">'
                     f'<title>{html.escape(label)}</title></polygon>')
    for label, colour, pts in lines:
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="curve" points="{path}" fill="none" stroke="{colour}" stroke-width="1.6">'
                     f'<title>{html.escape(label)}</title></polyline>')
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{colour}"/>')
    parts.append("</svg>")
    return "".join(parts)


def credit_colour(value: float, scale: float) -> str:
    """Diverging scale: blue for negative, white at 0, red for positive; |value| = scale is full colour."""
    t = 0.0 if scale <= 0 else max(-1.0, min(1.0, value / scale))
    if t >= 0:
        return f"rgb(255,{round(255 * (1 - 0.75 * t))},{round(255 * (1 - 0.75 * t))})"
    return f"rgb({round(255 * (1 + 0.75 * t))},{round(255 * (1 + 0.6 * t))},255)"


def _show(token: str) -> str:
    return html.escape(token.replace("\n", "⏎").replace(" ", "·") or "∅")


def token_heatmap(samples: list[dict[str, Any]], module: str) -> str:
    """Rows of coloured tokens for one credit module; the scale is the largest |credit| among them."""
    values = [v for s in samples for v in s["credit"].get(module, [])]
    scale = max((abs(v) for v in values), default=0.0)
    rows = []
    for s in samples:
        credit = s["credit"].get(module)
        if credit is None:
            continue
        spans = "".join(f'<span class="tok" style="background:{credit_colour(v, scale)}" data-credit="{v:.6g}" '
                        f'title="{html.escape(module)}: {v:.4g}">{_show(t)}</span>'
                        for t, v in zip(s["tokens"], credit, strict=True))
        rows.append(f'<div class="sample"><span class="meta">reward {s["reward"]:+.3f}</span>'
                    f'<span class="prompt">{html.escape(s["prompt"])}</span>{spans}</div>')
    low = -scale if scale else 0.0
    legend = (f'<div class="legend"><span>{low:.3g}</span><span class="bar"></span><span>{scale:.3g}</span>'
              f'<span class="legend-note">{html.escape(module)} (0 is white)</span></div>')
    return legend + "".join(rows)


def _load_run(path: Path, warn: Warn) -> dict[str, Any]:
    if not path.is_dir():
        raise InputError(f"{path}: no such run directory")
    if not (path / "metrics.jsonl").is_file():
        raise InputError(f"{path}: not a run directory (no metrics.jsonl); align train writes one into each run")
    return {"path": path, "name": path.name, "recipe": _optional_mapping(path / "recipe.yaml", yaml.safe_load, warn),
            "summary": _optional_mapping(path / "summary.json", json.loads, warn),
            "metrics": read_metrics(path, warn), "samples": read_samples(path, warn)}


def _optional_mapping(path: Path, parse: Callable[[str], Any], warn: Warn) -> dict[str, Any]:
    """``recipe.yaml`` or ``summary.json``: the report only labels runs with them, so one that is missing or
    unreadable (a run killed while writing it) leaves a gap, with a warning, rather than no report."""
    if not path.is_file():
        return {}
    try:
        value = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: bad JSON, or bytes that are not UTF-8
        value = None
    if not isinstance(value, dict):
        warn(f"{path}: not readable as a mapping; the report leaves out what it holds")
        return {}
    return value


def _chosen_steps(samples: list[dict[str, Any]], count: int = 3) -> list[int]:
    steps = sorted({s["step"] for s in samples})
    if len(steps) <= count:
        return steps
    return sorted({steps[0], steps[len(steps) // 2], steps[-1]})


def load_runs(paths: Sequence[str | Path], warn: Warn = warn_on_stderr) -> list[dict[str, Any]]:
    """The runs to report: each run directory, and the finished runs of each sweep directory (its manifest names
    their method and seed; an unfinished run is left out with a warning). A run given twice is read once."""
    runs: list[dict[str, Any]] = []
    seen: set[Path] = set()

    def add(path: Path, record: RunRecord | None = None) -> None:
        if path.resolve() in seen:
            return
        seen.add(path.resolve())
        run = _load_run(path, warn)
        record = record or _sweep_record(path)
        run["method"] = record.method if record else None
        run["seed"] = record.seed if record else _seed(run["recipe"])
        runs.append(run)

    for given in map(Path, paths):
        if not is_sweep_dir(given):
            add(given)
            continue
        manifest = load_manifest(given)
        finished = [r for r in manifest.runs.values() if r.status in FINISHED and (given / str(r.dir)).is_dir()]
        for record in manifest.runs.values():
            if record not in finished:
                why = "it failed; sweep.json holds its error" if record.status == "failed" else \
                    "not finished" if record.status not in FINISHED else f"its directory {record.dir} is gone"
                warn(f"{given}: run {record.id} is left out ({why})")
        if not finished:
            raise InputError(f"{given}: the sweep has no finished run yet; run `align sweep` to finish it")
        for record in finished:
            add(given / str(record.dir), record)
    return runs


def _sweep_record(run_dir: Path) -> RunRecord | None:
    """The manifest record of a run directory inside a sweep directory, if any (its method and seed)."""
    if not is_sweep_dir(run_dir.parent):
        return None
    try:
        manifest = load_manifest(run_dir.parent)
    except InputError:
        return None
    return next((r for r in manifest.runs.values() if r.dir == run_dir.name), None)


def _seed(recorded: dict[str, Any]) -> int | None:
    """The seed in a run's recipe.yaml as written (a dict, not a Recipe)."""
    seed = recorded.get("seed", 0) if recorded else None
    return seed if isinstance(seed, int) else None


@dataclass
class Report:
    """The page, and the per-method numbers it shows (also for the terminal table and ``--json``)."""

    page: str
    methods: list[MethodResult]
    metrics: list[str]

    def table(self) -> list[str]:
        return table_lines(self.methods, self.metrics)

    def numbers(self) -> dict[str, Any]:
        return to_json(self.methods, self.metrics)


def make_report(run_dirs: Sequence[str | Path], metrics: Sequence[str] = (), warn: Warn = warn_on_stderr) -> Report:
    """The page for one or more runs or sweeps, with each method's final ``metrics`` (held-out accuracy always)."""
    if not run_dirs:
        raise InputError("align report needs at least one run directory")
    runs = load_runs(run_dirs, warn)
    chosen = choose_metrics(runs, metrics)
    methods = summarise(runs, chosen)
    pooled = is_pooled(methods)
    curves = CURVES[:1] + _reward_curves(runs) + CURVES[1:]
    curves += [(key, [key]) for key in chosen if not any(key in keys for _, keys in curves)]
    if pooled:
        colours = {m.method: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
        charts = [_method_chart(title, keys, methods, colours) for title, keys in curves]
        legend = "".join(_swatch(colours[m.method], f"{m.method} ({len(m.runs)} runs)") for m in methods)
        shown = [m.runs[0] for m in methods]  # token heatmaps: one run per method
        note = "<p>One run per method (its first seed).</p>"
    else:
        colours = {run["name"]: PALETTE[i % len(PALETTE)] for i, run in enumerate(runs)}
        charts = [_run_chart(title, keys, runs, colours) for title, keys in curves]
        legend = "".join(_swatch(colours[r["name"]], r["name"]) for r in runs)
        shown, note = runs, ""
    overview = "".join(_overview_row(run) for run in runs)
    heatmaps = note + "".join(_run_tokens(run) for run in shown)
    curves_note = ("Each curve is a method's mean over its seeds; the shaded band is the 95% interval (Student t "
                   "over seeds) at each step." if pooled else "One curve per run.")
    page = _PAGE.format(title=html.escape(", ".join(r["name"] for r in runs)), legend=legend, overview=overview,
                        methods=_methods_table(methods, chosen), curves_note=curves_note,
                        charts="".join(c for c in charts if c), heatmaps=heatmaps)
    return Report(page, methods, chosen)


def build_report(run_dirs: Sequence[str | Path], warn: Warn = warn_on_stderr, metrics: Sequence[str] = ()) -> str:
    """The HTML page for one or more runs."""
    return make_report(run_dirs, metrics, warn).page


def _swatch(colour: str, label: str) -> str:
    return (f'<span class="run-key"><span class="swatch" style="background:{colour}"></span>{html.escape(label)}'
            "</span>")


def _run_chart(title: str, keys: list[str], runs: list[dict[str, Any]], colours: dict[str, str]) -> str:
    lines = []
    for run in runs:
        for key in keys:
            pts = _series(run["metrics"], key)
            if pts:
                lines.append((f"{run['name']} {key}", colours[run["name"]], pts))
                break
    return svg_chart(title, lines) if lines else ""


def _method_chart(title: str, keys: list[str], methods: list[MethodResult], colours: dict[str, str]) -> str:
    lines, bands = [], []
    for m in methods:
        curve = mean_curve(m.runs, keys)
        if not curve:
            continue
        colour = colours[m.method]
        lines.append((f"{m.method}: mean of {len(m.runs)} runs", colour, [(x, i.mean) for x, i in curve]))
        band = [(x, i.low, i.high) for x, i in curve if i.low is not None and i.high is not None]
        bands.append((f"{m.method}: 95% interval", colour, band))
    return svg_chart(f"{title} (mean, 95% band)", lines, bands=bands) if lines else ""


def _methods_table(methods: list[MethodResult], metrics: list[str]) -> str:
    head = "".join(f"<th>{html.escape(m)} (final)</th>" for m in metrics)
    rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td><td>{len(r.runs)}</td><td>{html.escape(format_seeds(r.seeds))}</td>"
        + "".join(f"<td>{html.escape(format_interval(m, r.intervals[m]))}</td>" for m in metrics) + "</tr>"
        for r in methods)
    return (f'<table class="methods"><tr><th>method</th><th>runs</th><th>seeds</th>{head}</tr>{rows}</table>'
            f"<p class=\"note\">{html.escape(METHOD_NOTE)}; the final value is each run's last logged one.</p>")


def _overview_row(run: dict[str, Any]) -> str:
    algorithm = run["recipe"].get("algorithm", {}).get("preset", "?")
    summary = run["summary"]
    before, after = summary.get("eval/accuracy_before"), summary.get("eval/accuracy_after")
    accuracy = f"{100 * before:.1f}% → {100 * after:.1f}%" if before is not None and after is not None else "–"
    steps = max((r["step"] for r in run["metrics"]), default=0)
    return (f"<tr><td>{html.escape(run['name'])}</td><td>{html.escape(str(algorithm))}</td><td>{steps}</td>"
            f"<td>{accuracy}</td></tr>")


def _run_tokens(run: dict[str, Any]) -> str:
    samples = run["samples"]
    if not samples:
        return f"<section><h3>{html.escape(run['name'])}</h3><p>No token samples were logged.</p></section>"
    parts = [f"<section class='tokens'><h3>{html.escape(run['name'])}</h3>"]
    for step in _chosen_steps(samples):
        chosen = [s for s in samples if s["step"] == step]
        modules = list(dict.fromkeys(m for s in chosen for m in s["credit"]))
        parts.append(f"<h4>step {step}: {len(chosen)} completions of <code>{html.escape(chosen[0]['prompt'])}"
                     "</code></h4>")
        for i, module in enumerate(modules):
            opened = " open" if i == 0 else ""
            parts.append(f"<details class='module'{opened}><summary>{html.escape(module)}</summary>"
                         f"{token_heatmap(chosen, module)}</details>")
    parts.append("</section>")
    return "".join(parts)


def write_report(run_dirs: Sequence[str | Path], output: str | Path, warn: Warn = warn_on_stderr,
                 metrics: Sequence[str] = ()) -> Path:
    """Write the page to ``output``, or to ``report.html`` inside it when it is a directory; returns the file."""
    return write_page(build_report(run_dirs, warn, metrics), output)  # a bad run directory leaves nothing behind


def write_page(page: str, output: str | Path) -> Path:
    """``page`` to ``output`` (``report.html`` inside it when it is a directory); returns the file."""
    out = Path(output)
    if out.is_dir():
        out = out / "report.html"
    return _write(out, page, "the report")


def write_numbers(report: Report, output: str | Path) -> Path:
    """The per-method numbers as JSON (``--json``)."""
    return _write(Path(output), json.dumps(report.numbers(), indent=2) + "\n", "--json")


def _write(out: Path, text: str, what: str) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except OSError as err:  # a folder on the way is a file, no permission, a full disk
        where = f" ({err.filename})" if err.filename and Path(err.filename) != out else ""
        raise InputError(f"cannot write {what} to {str(out)!r}: {err.strerror or err}{where}") from None
    return out


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>align report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 17px; margin-top: 28px; }} h4 {{ font-weight: 500; margin: 14px 0 6px; }}
table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.chart {{ border: 1px solid #eee; background: #fff; }}
.chart-title {{ font-size: 12px; font-weight: 600; }} .tick {{ font-size: 10px; fill: #666; }}
.axis {{ stroke: #999; stroke-width: 1; }}
.note {{ color: #555; font-size: 13px; }}
.run-key {{ margin-right: 14px; }} .swatch {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; }}
.sample {{ font-family: ui-monospace, monospace; margin: 3px 0; }}
.meta {{ display: inline-block; width: 130px; color: #555; white-space: nowrap; }}
.prompt {{ color: #888; margin-right: 2px; }}
.tok {{ padding: 1px 1px; border-radius: 2px; }}
.legend {{ display: flex; align-items: center; gap: 6px; font-size: 12px; margin: 6px 0; }}
.legend .bar {{ width: 160px; height: 10px; background: linear-gradient(to right, rgb(64,102,255), #fff,
  rgb(255,64,64)); border: 1px solid #ccc; }}
.legend-note {{ color: #666; }}
details.module summary {{ cursor: pointer; font-size: 13px; }}
</style></head><body>
<h1>align report</h1>
<div>{legend}</div>
<h2>Methods (seeds pooled)</h2>
{methods}
<h2>Runs</h2>
<table><tr><th>run</th><th>algorithm</th><th>steps</th><th>held-out accuracy</th></tr>{overview}</table>
<h2>Learning curves</h2>
<p class="note">{curves_note}</p>
<div class="charts">{charts}</div>
<h2>Where the credit goes</h2>
<p>Sampled completions of one prompt per chosen step. Each token is coloured by its credit: red pushed up, blue
pushed down, white none; hover a token for its value.</p>
{heatmaps}
</body></html>
"""
