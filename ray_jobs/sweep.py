"""``align sweep`` on Ray: each run of a sweep is one Ray task that trains it with the local runtime in a worker
process of its own (``max_calls=1``: the process exits after its run, so no state carries over between runs), with
``OMP_NUM_THREADS=1`` and the recipe's ``runtime.threads`` CPUs (one by default).

Without an address an embedded local Ray is started for the sweep and stopped after it, with as many CPUs as this
process may use (fewer with ``--parallel``); with one (``ray://host:10001``, ``auto``) the tasks go to that cluster,
whose workers need this package installed and the sweep's output directory on a shared filesystem. Registered as
the ``ray`` executor of the entry-point group ``align.sweep_executors``; the planning and bookkeeping live in
:mod:`align.sweep`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray

from align.errors import InputError
from align.sweep import JobOutcome, SweepJob, train_job

_OBJECT_STORE_BYTES = 200 * 2**20  # tasks return a few numbers; the default (30% of memory) would only be reserved
_PASSED_ENV = ("ALIGN_", "HF_", "TRANSFORMERS_", "PYTHONPATH")  # what a worker on another machine must share
_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _train(job: SweepJob) -> JobOutcome:
    return train_job(job)


class RaySweepExecutor:
    """:class:`align.sweep.SweepExecutor` running each job as a Ray task."""

    def run(self, jobs: Sequence[SweepJob], *, address: str | None, parallel: int | None,
            on_outcome: Callable[[JobOutcome], None]) -> None:
        started = _connect(address, jobs, parallel)
        try:
            _run(jobs, parallel, on_outcome)
        finally:
            if started:
                ray.shutdown()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _connect(address: str | None, jobs: Sequence[SweepJob], parallel: int | None) -> bool:
    """Connect to ``address`` or start an embedded Ray; True when this call started (or connected) it."""
    if ray.is_initialized():
        return False
    try:
        if address:  # the workers are another machine's: what they must share travels with the job
            env = {k: v for k, v in os.environ.items() if k.startswith(_PASSED_ENV)} | _THREAD_ENV
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": env})
        else:
            cpus = usable_cpus()
            if parallel is not None:
                cpus = min(cpus, parallel * max(job.cpus for job in jobs))
            # the workers inherit the environment Ray starts with (a runtime_env would make Ray start workers of
            # its own beside the ones it prestarts, each importing ray again on CPUs the runs need)
            with _environment({"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **_THREAD_ENV}):
                ray.init(address="local", num_cpus=max(cpus, 1), include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, object_store_memory=_OBJECT_STORE_BYTES,
                         _temp_dir=os.environ.get("ALIGN_RAY_TMP", "/tmp/ray-align"))
    except Exception as err:  # ConnectionError, TimeoutError, RuntimeError, ValueError for a malformed address
        where = f"the Ray cluster at {address!r}" if address else "an embedded local Ray"
        raise InputError(f"--address: cannot start or reach {where}: {' '.join(str(err).split())[:200]}; give "
                         "ray://<head>:10001, auto (a cluster started with `ray start` here) or no --address") \
            from None
    return True


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the duration, as it was afterwards."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(jobs: Sequence[SweepJob], parallel: int | None, on_outcome: Callable[[JobOutcome], None]) -> None:
    resources = ray.cluster_resources()
    cpus, gpus = max(int(resources.get("CPU", 1)), 1), int(resources.get("GPU", 0))
    task = ray.remote(max_calls=1, max_retries=0)(_train)
    queue = list(jobs)
    limit = parallel or len(queue)
    pending: dict[Any, tuple[SweepJob, float]] = {}
    while queue or pending:
        while queue and len(pending) < limit:
            job = queue.pop(0)
            if job.gpus > gpus:
                on_outcome(JobOutcome(job.id, f"needs a GPU (runtime.device cuda) and the Ray cluster has "
                                              f"{gpus}; set runtime.device=cpu or add GPU nodes", 0.0))
                continue
            # a run wanting more CPUs than the whole cluster has would wait forever: it gets all of them
            ref = task.options(num_cpus=min(job.cpus, cpus), num_gpus=job.gpus).remote(job)
            pending[ref] = (job, time.perf_counter())
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            job, start = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker died (OOM, a signal), or the task could not start
                first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                outcome = JobOutcome(job.id, f"the Ray task ended without a result ({type(err).__name__}: "
                                             f"{' '.join(first.split())[:200]}); see {job.log_file}",
                                     time.perf_counter() - start)
            on_outcome(outcome)
