"""Running ``align sweep``: what is left of a checked plan (:mod:`align.sweep.plan`) goes to a
:class:`SweepExecutor` and the manifest (:mod:`align.manifest`) is saved after each run ends.

Finished runs are skipped, runs with a checkpoint resume, and a run that fails leaves the others running. The
executor is found through the entry-point group ``align.sweep_executors`` (``ray``: ``ray_jobs.sweep``, Ray tasks),
so the core never imports ray; each task trains one run with the local runtime in a process of its own
(:func:`train_job`).

Imports only the standard library and torch-free parts of ``align`` at import time.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from align.errors import AlignError, InputError
from align.manifest import FINISHED, Manifest, RunRecord, load_manifest, read_json_mapping, run_dirs_of
from align.sweep.plan import Resolved

EXECUTORS_GROUP = "align.sweep_executors"
FINAL_KEYS = ("eval/accuracy", "eval/preference_accuracy")  # held-out, recorded before and after each run


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepJob:
    """What one Ray task needs to train one run (plain data: it travels to another process or machine)."""

    id: str
    recipe: str
    overrides: tuple[str, ...]
    resume: str | None  # a run directory with a checkpoint to continue
    cpus: int
    gpus: int
    log_file: str
    cwd: str  # relative paths in the recipe mean what they mean here


@dataclass(frozen=True)
class JobOutcome:
    id: str
    error: str | None  # one line; None when the run trained to the end
    seconds: float


class SweepExecutor(Protocol):
    """Runs jobs, at most ``parallel`` at a time (None: as many as the cluster fits), each in a process of its
    own; calls ``on_outcome`` as each one ends, failed or not. ``address``: a Ray address (``ray://...``, ``auto``)
    or None for an embedded local Ray. A cluster that cannot be reached is a one-line AlignError."""

    def run(self, jobs: Sequence[SweepJob], *, address: str | None, parallel: int | None,
            on_outcome: Callable[[JobOutcome], None]) -> None: ...


def sweep_executor(name: str = "ray") -> SweepExecutor:
    """The executor registered under the entry-point group ``align.sweep_executors`` (``ray``: ``ray_jobs.sweep``)."""
    for ep in entry_points(group=EXECUTORS_GROUP):
        if ep.name == name:
            try:
                executor: SweepExecutor = ep.load()()
            except ImportError as err:
                raise InputError(f"the {name} sweep executor cannot load ({err}); install ray (pip install -e .)") \
                    from None
            return executor
    raise InputError(f"no {name!r} sweep executor is installed (entry point group {EXECUTORS_GROUP}); reinstall the "
                     "package with `pip install -e .`")


def run_sweep(resolved: Sequence[Resolved], out: Path, *, executor: SweepExecutor | None = None,
              address: str | None = None, parallel: int | None = None,
              log: Callable[[str], None] = print) -> list[RunRecord]:
    """Run what is left of the sweep; returns the records of its runs (in plan order) as the manifest holds them.
    Finished runs are skipped, runs with a checkpoint resume, and a run that fails leaves the others running.
    ``executor``: default the ``ray`` one of :data:`EXECUTORS_GROUP`, looked up only when a run is left."""
    manifest = load_manifest(out)
    plan: list[RunRecord] = []
    jobs: list[SweepJob] = []
    for item in resolved:
        run = item.run
        record = RunRecord(id=run.id, recipe=str(run.recipe), method=run.method, overrides=list(run.overrides),
                           seed=run.seed)
        manifest.runs[run.id] = record
        plan.append(record)
        if item.finished is not None:
            record.status, record.dir = "skipped", item.finished.name
            record.final = _final(item.finished)
            continue
        if item.resume is not None:
            record.dir = item.resume.name
        jobs.append(_job(item, out))
    if jobs and executor is None:
        executor = sweep_executor()
    manifest.save()
    skipped = len(plan) - len(jobs)
    if skipped:
        log(f"{skipped} of {len(plan)} runs finished earlier: skipped")
    if jobs and executor is not None:
        log(f"running {len(jobs)} runs ({'at most ' + str(parallel) if parallel else 'as many as fit'} at a time); "
            f"logs in {out / 'logs'}")
        done = 0

        def on_outcome(outcome: JobOutcome) -> None:
            nonlocal done
            done += 1
            _record(manifest, manifest.runs[outcome.id], outcome)
            manifest.save()
            verdict = "done" if outcome.error is None else f"FAILED: {outcome.error}"
            log(f"[{done}/{len(jobs)}] {outcome.id} ({outcome.seconds:.0f} s): {verdict}")

        executor.run(jobs, address=address, parallel=parallel, on_outcome=on_outcome)
    return plan


def _job(item: Resolved, out: Path) -> SweepJob:
    runtime = item.recipe.runtime
    return SweepJob(id=item.run.id, recipe=str(item.run.recipe), overrides=item.run.train_overrides(out),
                    resume=None if item.resume is None else str(item.resume), cpus=runtime.threads or 1,
                    gpus=1 if runtime.device.startswith("cuda") else 0,
                    log_file=str(out / "logs" / f"{item.run.id}.log"), cwd=os.getcwd())


def _record(manifest: Manifest, record: RunRecord, outcome: JobOutcome) -> None:
    dirs = run_dirs_of(manifest.root, record.id)
    record.dir = dirs[-1].name if dirs else record.dir
    record.status = "done" if outcome.error is None else "failed"
    record.error = outcome.error
    record.final = _final(dirs[-1]) if dirs and outcome.error is None else {}


def _final(run_dir: Path) -> dict[str, float]:
    summary = read_json_mapping(run_dir / "summary.json") or {}
    return {f"{key}_{when}": summary[f"{key}_{when}"] for key in FINAL_KEYS for when in ("before", "after")
            if isinstance(summary.get(f"{key}_{when}"), (int, float))}


def train_job(job: SweepJob) -> JobOutcome:
    """One run, in this process: ``align train <recipe> <overrides>`` (resuming where a checkpoint is), with its
    log lines in ``job.log_file``. Any failure comes back as one line (the traceback goes to the log)."""
    start = time.perf_counter()
    log_path = Path(job.log_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if Path(job.cwd).is_dir():
        os.chdir(job.cwd)
    with open(log_path, "a", buffering=1) as log:

        def write(line: str) -> None:
            log.write(line + "\n")

        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: align train {job.recipe} "
                  f"{' '.join(job.overrides)}{' --resume-from ' + job.resume if job.resume else ''}\n")
        try:
            from align import api

            api.train(job.recipe, *job.overrides, resume=job.resume or False, progress=False,
                      log=write)
        except Exception as err:  # a run that fails must not take the sweep down: it reports, the others go on
            log.write(traceback.format_exc())
            kind = "" if isinstance(err, AlignError) else f"{type(err).__name__}: "
            message = " ".join(f"{kind}{err}".split())
            return JobOutcome(job.id, f"{message} (log: {log_path})", time.perf_counter() - start)
    return JobOutcome(job.id, None, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------
# The end of a sweep
# ---------------------------------------------------------------------------------------------------------------
def summary_lines(records: Sequence[RunRecord]) -> list[str]:
    """A short table: run, seed, status, held-out accuracy before -> after."""
    rows = [("run", "seed", "status", "held-out accuracy")]
    for r in records:
        key = next((k for k in FINAL_KEYS if f"{k}_after" in r.final), None)
        accuracy = "-" if key is None else \
            f"{100 * r.final[key + '_before']:.1f}% -> {100 * r.final[key + '_after']:.1f}%"
        rows.append((r.id, str(r.seed), r.status, accuracy))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
            for row in rows]


def failure_lines(records: Sequence[RunRecord]) -> list[str]:
    return [f"failed: {r.id}: {r.error}" for r in records if r.status == "failed"]


def unfinished(records: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.status not in FINISHED]
