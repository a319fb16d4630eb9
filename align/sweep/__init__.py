"""``align sweep``: recipes × combinations of ``--set`` values × seeds, each an ordinary run directory under the
sweep's output directory, run as Ray tasks (an embedded local Ray, or a cluster), listed in ``<out>/sweep.json``.

:mod:`align.sweep.plan` plans and checks (before anything runs); :mod:`align.sweep.run` runs what is left and keeps
the manifest. Nothing here imports torch or ray at import time.
"""

from __future__ import annotations

from align.sweep.plan import (
    PlannedRun,
    Resolved,
    check_sweep,
    default_out,
    parse_seeds,
    parse_set,
    plan_sweep,
    recipe_difference,
)
from align.sweep.run import (
    EXECUTORS_GROUP,
    JobOutcome,
    SweepExecutor,
    SweepJob,
    failure_lines,
    run_sweep,
    summary_lines,
    sweep_executor,
    train_job,
    unfinished,
)

__all__ = ["EXECUTORS_GROUP", "JobOutcome", "PlannedRun", "Resolved", "SweepExecutor", "SweepJob", "check_sweep",
           "default_out", "failure_lines", "parse_seeds", "parse_set", "plan_sweep", "recipe_difference",
           "run_sweep", "summary_lines", "sweep_executor", "train_job", "unfinished"]
