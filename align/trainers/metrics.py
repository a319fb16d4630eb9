"""Metrics of a run: one JSON object per line in ``metrics.jsonl``, and TensorBoard scalars, in the run directory."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.errors import InputError
from align.trainers.jsonl import Warn, keep_steps_up_to, read_jsonl, warn_on_stderr

TIMING_PREFIXES = ("time/", "throughput/")
"""Metrics that depend on wall-clock time (and so differ between otherwise identical runs)."""


class MetricsLogger:
    """JSONL always; TensorBoard by default; Weights & Biases and MLflow when named in ``backends``.

    wandb follows ``WANDB_MODE`` (``offline`` writes under the run directory, nothing leaves the machine); MLflow
    follows ``MLFLOW_TRACKING_URI`` and otherwise writes a local file store under ``<run_dir>/mlruns``.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, backends: Sequence[str] = (),
                 project: str = "align", config: dict[str, Any] | None = None, warn: Warn = warn_on_stderr) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.warn = warn
        self.writer: Any = None
        self.wandb: Any = None
        self.mlflow: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard missing: JSONL still has everything
                self.writer = None
        for backend in backends:
            try:
                if backend == "wandb":
                    import wandb

                    self.wandb = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                                            resume="allow", id=run_dir.name)
                elif backend == "mlflow":
                    import mlflow

                    if not os.environ.get("MLFLOW_TRACKING_URI"):
                        # a local file store in the run directory (MLflow 3 asks for an explicit opt-in to it)
                        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
                    mlflow.set_experiment(project)
                    self.mlflow = mlflow
                    mlflow.start_run(run_name=run_dir.name)
                    if config:
                        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})
                else:
                    raise InputError(f"unknown logging backend {backend!r}; valid: wandb, mlflow")
            except ImportError as err:
                raise InputError(f"logging backend {backend!r} is not installed ({err}); pip install {backend}") \
                    from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        finite = {k: v for k, v in clean.items() if v is not None}
        if self.writer is not None:
            for key, value in finite.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(finite, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in finite.items()}, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run re-logs them), and a torn last line."""
        keep_steps_up_to(self.path, step, self.warn)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_metrics(run_dir: Path, warn: Warn = warn_on_stderr) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (a torn last line dropped with a warning)."""
    return read_jsonl(run_dir / "metrics.jsonl", warn)
