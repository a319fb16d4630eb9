"""The one controller loop, for every runtime and every workload.

    collect (rollout -> reward -> credit -> advantage, or pairs) -> learner step -> weight sync -> probe
    -> samples -> evaluation -> metrics -> checkpoint

The parts arrive through the core's protocols (:mod:`align.trainers.protocols`): the same loop drives them in one
process (``backend: local``) or behind Ray actors (``backend: ray``). Checkpoints hold the learner's part and the
loop's state (data order, weight version, RNG, the generation batches in flight), written by
:func:`~align.trainers.checkpoint.save_checkpoint` whole or not at all; a resumed run continues exactly where the
checkpoint left it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from align.trainers.metrics import MetricsLogger
from align.trainers.probe import ProbeCheck
from align.trainers.progress import Progress
from align.trainers.protocols import Learner, LearnerLost, RolloutEngine, WeightSync, Workload
from align.trainers.samples import SampleRecorder
from align.trainers.workload import TrainingStopped


@dataclass(frozen=True)
class Schedule:
    steps: int
    eval_every: int
    sample_every: int
    checkpoint_every: int
    keep: int = 2
    probe_every: int = 1


@dataclass
class Controller:
    workload: Workload
    learner: Learner
    schedule: Schedule
    evaluate: Callable[[], dict[str, float]]  # held-out metrics of the current policy
    logger: MetricsLogger
    sync: WeightSync | None = None  # None: nothing samples (preference training)
    engine: RolloutEngine | None = None  # for the probe
    probe: ProbeCheck | None = None
    samples: SampleRecorder | None = None
    log: Callable[[str], None] = print
    progress: bool = True
    version: int = 0

    def run(self, run_dir: Path, checkpoint: Path | None) -> tuple[dict[str, float], dict[str, float]]:
        """Train from ``checkpoint`` (or the start) to the last step; returns (metrics before training, the last
        step's metrics)."""
        start, before = 0, None
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, load_learner=self.learner.load)
            start, before = state.step, state.extra["before"]
            self.workload.load_state_dict(state.extra["workload"])
            self.version = int(state.extra["version"])
            self.log(f"resuming {run_dir} from step {start}")
        try:
            return self._loop(run_dir, start, before)
        except LearnerLost as err:  # wherever a rank died: stepping, evaluating, saving, syncing
            saved = latest_checkpoint(run_dir / "checkpoints")
            where = f"its last checkpoint ({saved.name})" if saved else "the start (no checkpoint yet)"
            raise LearnerLost(f"{err}; the run stopped cleanly: `align train <recipe> --resume-from {run_dir}` "
                              f"continues from {where}") from None

    def _loop(self, run_dir: Path, start: int,
              before: dict[str, float] | None) -> tuple[dict[str, float], dict[str, float]]:
        if self.sync is not None:
            self.sync.push(self.version)  # the engine starts from the learner's weights, whatever the checkpoint
        self.logger.truncate_after(start)
        if self.samples is not None:
            self.samples.truncate_after(start)
        if before is None:
            before = self.evaluate()
            self.logger.log(0, before)
            self.log(f"run directory: {run_dir}")
        bar = Progress(self.schedule.steps, start, self.progress, self.log)
        last: dict[str, float] = {}
        try:
            for step in range(start + 1, self.schedule.steps + 1):
                try:
                    last = self._step(step)
                except LearnerLost as err:
                    raise LearnerLost(f"{err} at step {step}") from None
                except TrainingStopped as err:
                    self.logger.log(step, err.metrics)  # the counts that stopped it stay on record
                    raise TrainingStopped(f"{err}. {_what_is_kept(run_dir, step)}", err.metrics) from None
                if step % self.schedule.eval_every == 0 or step == self.schedule.steps:
                    last.update(self.evaluate())
                self.logger.log(step, last)
                bar.update(step, last)
                if step % self.schedule.checkpoint_every == 0 or step == self.schedule.steps:
                    save_checkpoint(run_dir / "checkpoints", step=step, save_learner=self.learner.save,
                                    keep=self.schedule.keep,
                                    extra={"workload": self.workload.state_dict(), "version": self.version,
                                           "before": before})
        finally:
            bar.close()
            self.logger.close()
        return before, last

    def _step(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        # the steps left after this one: a workload samples ahead (runtime.max_staleness) for those only, so nothing
        # is in flight when the run ends; what is in flight at a checkpoint is saved with it (Workload.state_dict)
        collected = self.workload.collect(step, self.version, self.schedule.steps - step)
        metrics = dict(collected.metrics)
        if collected.batch is None:  # nothing to train on (every row dropped): the weights stay as they are
            metrics["time/step"] = time.perf_counter() - started
            return metrics
        update_start = time.perf_counter()
        metrics.update(self.learner.step(collected.batch))
        metrics["time/update"] = time.perf_counter() - update_start
        self.version += 1
        if self.sync is not None:
            sync_start = time.perf_counter()
            self.sync.push(self.version)
            metrics["time/weight_sync"] = time.perf_counter() - sync_start
            metrics["weight_version"] = float(self.version)
            if self.probe is not None and not self.sync.shares_module and step % self.schedule.probe_every == 0:
                assert self.engine is not None
                # seeded by the version, not drawn: the training stream is the same whether a runtime probes or not
                metrics["weight_sync/probe_max_gap"] = self.probe(self.engine, self.learner, self.version,
                                                                  seed=self.version).max_gap
        if self.samples is not None and collected.rollout is not None and \
                (step == 1 or step % self.schedule.sample_every == 0):
            assert collected.rewards is not None and collected.advantages is not None
            self.samples.record(step, collected.rollout, collected.rewards, collected.advantages, collected.credit)
        metrics.update(step_timings(metrics, time.perf_counter() - started))
        if collected.rollout is not None:
            metrics["throughput/tokens_per_s"] = float(collected.rollout.mask.sum()) / metrics["time/step"]
        return metrics


def _what_is_kept(run_dir: Path, step: int) -> str:
    """Where a stopped run's work is: nothing saved is removed, and a resume continues from the checkpoint."""
    saved = latest_checkpoint(run_dir / "checkpoints")
    where = (f"its last checkpoint is {saved} (after the fix, `align train <recipe> --resume-from {run_dir}` "
             "continues from it)" if saved else "it has no checkpoint yet")
    return (f"The run stopped at step {step} without training on it: metrics up to this step are in "
            f"{run_dir / 'metrics.jsonl'}, {where}")


def step_timings(metrics: dict[str, float], total: float) -> dict[str, float]:
    """Where a step's wall time went. The work is generation (inside the engine), reward compute, DAPO's refill
    batches (their generation and rewards), the reference forward, the critic's V_old forward (PPO) and the
    learner's compute (the slowest rank: forward, backward, all-reduce, optimiser); everything else (Ray dispatch
    and object transfer, serialisation, advantage estimation, weight sync) is overhead. With
    ``runtime.max_staleness`` (``overlap``) generation runs during earlier steps, so only the part the loop waited
    for counts."""
    generate = min(metrics.get("time/rollout", 0.0), metrics.get("time/generate", 0.0))
    reward = metrics.get("time/reward_compute", metrics.get("time/reward", 0.0))
    work = (generate + reward + metrics.get("time/refill", 0.0) + metrics.get("time/reference", 0.0)
            + metrics.get("time/critic", 0.0) + metrics.get("time/learner_compute", 0.0))
    overhead = max(0.0, total - work)
    return {"time/step": total, "time/overhead": overhead, "time/overhead_frac": overhead / total if total else 0.0}
