"""A run's JSONL logs after a kill: a torn last line is dropped with a one-line warning (resume and report), a
damaged line before it is a one-line error naming the file and line; ``align report`` answers bad input in one
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.errors import InputError
from align.report import build_report, write_report
from align.trainers.jsonl import read_jsonl
from align.trainers.metrics import MetricsLogger, read_metrics
from align.trainers.samples import SampleRecorder, read_samples

TORN_TAILS = {
    "cut inside the JSON": b'{"step": 3, "loss": 0.',
    "cut inside a character": '{"step": 3, "tokens": ["\u00e9'.encode()[:-1],
    "zero-filled": b"\x00" * 40,
    "whole but without its step": b'{"loss": 1.0}',
}


def write_rows(path: Path, steps: range, tail: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps({"step": s, "loss": float(s)}).encode() + b"\n" for s in steps) + tail)
    return path


@pytest.mark.parametrize("tail", TORN_TAILS.values(), ids=TORN_TAILS.keys())
def test_a_torn_last_line_is_dropped_with_a_warning_naming_file_and_line(tmp_path: Path, tail: bytes) -> None:
    path = write_rows(tmp_path / "metrics.jsonl", range(3), tail)
    warnings: list[str] = []
    assert [r["step"] for r in read_jsonl(path, warnings.append)] == [0, 1, 2]
    assert len(warnings) == 1 and str(path) in warnings[0] and "line 4" in warnings[0]
    assert "\n" not in warnings[0]


def test_a_whole_file_reads_without_warnings(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "metrics.jsonl", range(3), b"\n\n")
    warnings: list[str] = []
    assert [r["step"] for r in read_jsonl(path, warnings.append)] == [0, 1, 2]
    assert read_jsonl(tmp_path / "missing.jsonl") == [] and not warnings


def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "loss": oops}\n{"step": 3}\n')
    with pytest.raises(InputError, match=r"samples.jsonl: line 2 is not a JSON object with a step") as err:
        read_jsonl(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tail", TORN_TAILS.values(), ids=TORN_TAILS.keys())
def test_resume_truncation_drops_a_torn_tail_and_keeps_lines_byte_for_byte(tmp_path: Path, tail: bytes) -> None:
    warnings: list[str] = []
    metrics = write_rows(tmp_path / "metrics.jsonl", range(6), tail)
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(b'{"step": 1, "prompt": "1+1=", "tokens": ["\xc3\xa9"]}\n{"step": 5}\n' + tail)
    logger = MetricsLogger(tmp_path, tensorboard=False, warn=warnings.append)
    logger.truncate_after(3)
    recorder = SampleRecorder(tmp_path, tokenizer=None, per_step=1, max_bytes=1 << 20, warn=warnings.append)
    recorder.truncate_after(3)
    expected = b"".join(json.dumps({"step": s, "loss": float(s)}).encode() + b"\n" for s in range(4))
    assert metrics.read_bytes() == expected
    assert samples.read_bytes() == b'{"step": 1, "prompt": "1+1=", "tokens": ["\xc3\xa9"]}\n'
    assert len(warnings) == 2 and "metrics.jsonl: line 7" in warnings[0] and "samples.jsonl: line 3" in warnings[1]
    logger.log(4, {"loss": 4.0})  # appending after the torn line was dropped gives whole lines
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in read_samples(tmp_path)] == [1]


def test_resume_truncation_refuses_a_damaged_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(InputError, match=r"metrics\.jsonl: line 2"):
        MetricsLogger(tmp_path, tensorboard=False).truncate_after(1)
    assert path.read_text() == '{"step": 0}\n{"step": 1\n{"step": 2}\n'  # left for the user to mend


def fake_run(root: Path, tail: bytes = b"") -> Path:
    run = root / "run-a"
    run.mkdir(parents=True)
    write_rows(run / "metrics.jsonl", range(4), tail)
    (run / "samples.jsonl").write_text(json.dumps({"step": 1, "prompt": "1+1=", "completion": "2", "reward": 1.0,
                                                   "tokens": ["2"], "credit": {"advantage": [0.5]}}) + "\n" + '{"st')
    (run / "summary.json").write_text('{"eval/accuracy_bef')  # killed while writing it (older versions)
    (run / "recipe.yaml").write_text("algorithm: {preset: grpo}\n")
    return run


def test_report_reads_a_killed_run_with_one_warning_per_torn_file(tmp_path: Path) -> None:
    run = fake_run(tmp_path, b'{"step": 4, "lo')
    warnings: list[str] = []
    page = build_report([run], warnings.append)
    assert "run-a" in page and "grpo" in page and "data-credit" in page
    assert [w.split(":")[0] for w in warnings] == [str(run / "summary.json"), str(run / "metrics.jsonl"),
                                                   str(run / "samples.jsonl")]


def test_report_to_an_existing_directory_writes_report_html_inside_it(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    out = tmp_path / "reports"
    out.mkdir()
    assert write_report([run], out, lambda _: None) == out / "report.html"
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    result = CliRunner().invoke(app, ["report", str(run), "-o", str(out)])
    assert result.exit_code == 0 and f"report: {out / 'report.html'}" in result.output


@pytest.mark.parametrize("case", ["no metrics.jsonl", "no such directory", "output under a file",
                                  "damaged metrics line"])
def test_report_answers_bad_input_in_one_line(tmp_path: Path, case: str) -> None:
    run, out = fake_run(tmp_path), tmp_path / "report.html"
    if case == "no metrics.jsonl":
        (run / "metrics.jsonl").unlink()
    if case == "no such directory":
        run = tmp_path / "nowhere"
    if case == "output under a file":
        out = run / "recipe.yaml" / "report.html"
    if case == "damaged metrics line":
        (run / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    result = CliRunner().invoke(app, ["report", str(run), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(run if case != "output under a file" else out) in lines[0], result.output
    assert "Traceback" not in result.output
