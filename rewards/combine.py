"""Weighted composition of rewards with fault isolation.

A reward that raises, hangs past its timeout, or returns NaN, inf, a number too large for a float (``10**400``),
None, a non-number or the wrong number of values never stops the composer: the affected samples get the term's
policy (``"drop"``: the sample leaves the batch; ``"fallback"``: it gets a fixed value), every case is counted in the
metrics (``reward/<name>/errors``, ``.../timeouts``, ``.../nonfinite``, ``.../none``, ``.../wrong_count``, and
``.../failed``: every kind but ``none``, which is a reward's way to give no verdict), the first malfunction of each
reward in a batch is kept in :attr:`RewardScores.failures` (for the trainer's stop rule), and the first traceback of
each kind is logged once per reward, not once per sample.

Isolation: each call gets its own copies of the mutable data it reads (token id lists, list- or dict-valued dataset
columns, the lists of a batched call, list-valued options), so a reward that edits its inputs changes nothing that
another reward, a later call or the trainer sees. Text and numbers are immutable and shared.

Timeouts: per call (one sample, or one batch for batched rewards), counted from the call's start. Each reward has
its own pool of daemon threads, kept for the run: at most ``workers`` for a per-sample sync reward, one for a reward
called once per batch (batched, or async). A sync call cannot be interrupted from Python:
when it times out it keeps its thread until it returns (its late result is ignored), and while every thread of a
reward is held that way its next calls fail at once as timeouts, without waiting and without new threads. An
``async`` reward runs on an event loop in one of those threads and is cancelled at its timeout. Rewards that may
hang on untrusted input (running generated code) should use :mod:`rewards.sandbox`, which kills a process.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from align.errors import InputError
from rewards.registry import REWARDS, RewardFunction

logger = logging.getLogger("rewards")

FailurePolicy = Literal["drop", "fallback"]
FAILURE_KINDS = ("errors", "timeouts", "nonfinite", "none", "wrong_count")
MALFUNCTIONS = ("errors", "timeouts", "nonfinite", "wrong_count")  # counted in reward/<name>/failed; None is not one
LOOP_GRACE_SECONDS = 1.0  # an async reward's event loop gets this long past the timeout to cancel its calls
IDLE_THREAD_SECONDS = 60.0  # an unused pool thread exits after this long: a dropped composer leaves no threads

_IMMUTABLE = (str, bytes, int, float, complex, type(None))


def _anything(key: str) -> bool:
    return True


def _private(value: Any) -> Any:
    """A copy of ``value`` that one call may change freely; immutable values (text, numbers) are shared as they are,
    which keeps the common case free."""
    if isinstance(value, _IMMUTABLE):
        return value
    if type(value) in (list, tuple) and all(isinstance(item, _IMMUTABLE) for item in value):
        return list(value) if type(value) is list else value
    try:
        return copy.deepcopy(value)
    except Exception:  # an object that cannot be copied (a lock, a handle) is shared rather than failing the batch
        return value


@dataclass(frozen=True)
class RewardBatch:
    """What rewards are computed from; every list has one entry per completion (B)."""

    prompts: Sequence[str]
    completions: Sequence[str]
    completion_ids: Sequence[Sequence[int]]
    columns: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # dataset columns, e.g. "answer"
    step: int = 0  # optimiser step, for curricula

    def __post_init__(self) -> None:
        n = len(self.completions)
        sizes = {"prompts": len(self.prompts), "completion_ids": len(self.completion_ids)}
        sizes.update({f"column {k!r}": len(v) for k, v in self.columns.items()})
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            detail = ", ".join(f"{k} has {v}" for k, v in wrong.items())
            raise InputError(f"reward batch has {n} completions but {detail}")

    def __len__(self) -> int:
        return len(self.completions)

    def sample_kwargs(self, i: int, wanted: Callable[[str], bool] = _anything) -> dict[str, Any]:
        """Sample ``i``'s fields that ``wanted`` accepts, as one call's own copies."""
        kw: dict[str, Any] = {k: _private(v[i]) for k, v in self.columns.items() if wanted(k)}
        kw.update((k, v) for k, v in (("prompt", self.prompts[i]), ("completion", self.completions[i]),
                                      ("step", self.step)) if wanted(k))
        if wanted("completion_ids"):
            kw["completion_ids"] = list(self.completion_ids[i])  # token ids are ints: a flat copy is a full one
        return kw

    def batch_kwargs(self, wanted: Callable[[str], bool] = _anything) -> dict[str, Any]:
        """Every field that ``wanted`` accepts, as lists that are one call's own copies."""
        kw: dict[str, Any] = {k: [_private(x) for x in v] for k, v in self.columns.items() if wanted(k)}
        kw.update((k, v()) for k, v in (("prompts", lambda: list(self.prompts)),
                                        ("completions", lambda: list(self.completions)),
                                        ("completion_ids", lambda: [list(c) for c in self.completion_ids]),
                                        ("step", lambda: self.step)) if wanted(k))
        return kw


@dataclass(frozen=True)
class RewardTerm:
    """One reward in a weighted sum, with its options and failure policy."""

    name: str
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)
    on_failure: FailurePolicy = "drop"
    fallback: float = 0.0
    timeout: float | None = None  # overrides the reward's own and the composer's default


@dataclass
class RewardScores:
    """Scores of one batch. ``total`` is NaN where ``valid`` is False (dropped samples)."""

    total: Tensor  # (B,) float64, the weighted sum
    valid: Tensor  # (B,) bool
    per_reward: dict[str, Tensor]  # name -> (B,) raw values, NaN where the call failed
    metrics: dict[str, float]
    failures: dict[str, str] = field(default_factory=dict)  # name -> its first malfunction in this batch, in words


def _totals(total: Tensor, valid: Tensor) -> dict[str, float]:
    return {"reward/total/mean": float(total[valid].mean()) if bool(valid.any()) else math.nan,
            "reward/dropped": float((~valid).sum())}


def merge_scores(parts: Sequence[RewardScores]) -> RewardScores:
    """Scores of consecutive shards of one batch (a reward pool's workers), as if scored at once."""
    total = torch.cat([p.total for p in parts])
    valid = torch.cat([p.valid for p in parts])
    per_reward = {name: torch.cat([p.per_reward[name] for p in parts]) for name in parts[0].per_reward}
    metrics: dict[str, float] = {}
    failures: dict[str, str] = {}
    for name, raw in per_reward.items():
        good = raw[torch.isfinite(raw)]
        metrics[f"reward/{name}/mean"] = float(good.mean()) if good.numel() else math.nan
        metrics[f"reward/{name}/std"] = float(good.std()) if good.numel() > 1 else 0.0
        for kind in (*FAILURE_KINDS, "failed"):
            metrics[f"reward/{name}/{kind}"] = sum(p.metrics.get(f"reward/{name}/{kind}", 0.0) for p in parts)
        first = next((p.failures[name] for p in parts if name in p.failures), None)
        if first is not None:
            failures[name] = first
    return RewardScores(total=total, valid=valid, per_reward=per_reward, metrics={**metrics, **_totals(total, valid)},
                        failures=failures)


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def _shown(value: Any) -> str:
    """``value`` for a message: short, and never itself a failure (str() of a huge int raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an int of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = repr(value)
    except Exception:
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class _Outcome:
    value: float | None = None
    kind: str | None = None  # one of FAILURE_KINDS, None when the value is good
    error: BaseException | None = None  # what the reward raised, when it raised
    detail: str = ""  # what went wrong otherwise

    def describe(self) -> str:
        if self.error is not None:
            return f"raised {type(self.error).__name__}: {_first_line(self.error)}"
        return self.detail


def _to_float(value: Any) -> _Outcome:
    """A reward's value as a finite float, or the failure it is. Nothing here raises: a tensor of the wrong size, a
    custom ``__float__`` that throws or an int too large for a float are outcomes like any other."""
    if value is None:
        return _Outcome(kind="none", detail="returned None")
    if isinstance(value, (str, bytes)):  # float("1") would work, but text is not a score
        return _Outcome(kind="errors", detail=f"returned {type(value).__name__} {_shown(value)}, not a number")
    try:
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        number = float(value)  # bools, numpy and torch scalars, Decimal, Fraction
    except OverflowError:
        return _Outcome(kind="nonfinite", detail=f"returned {_shown(value)}, too large for a float")
    except Exception as err:
        return _Outcome(kind="errors", detail=f"returned {type(value).__name__}, not a number ({_first_line(err)})")
    if not math.isfinite(number):
        return _Outcome(kind="nonfinite", detail=f"returned {number}")
    return _Outcome(value=number)


def _weighable(outcome: _Outcome, weight: float) -> _Outcome:
    """A finite value whose weighted value is not (1e308 times 10) counts as nonfinite: the sum must stay finite."""
    if outcome.value is None or math.isfinite(weight * outcome.value):
        return outcome
    return _Outcome(kind="nonfinite", detail=f"returned {outcome.value:g}, which times its weight {weight:g} is too "
                                             "large for a float")


class _Job:
    """One call on a pool thread; ``result`` is set (an _Outcome when the call raised) before ``finished``."""

    __slots__ = ("call", "finished", "result", "wake")

    def __init__(self, call: Callable[[], Any], wake: threading.Event) -> None:
        self.call, self.wake = call, wake
        self.result: Any = None
        self.finished = False


class RewardThreads:
    """At most ``size`` daemon threads for one reward, started when needed and reused for the whole run.

    A job holds its thread until the call returns, however long after its timeout: a call stuck forever keeps one
    thread, never more, and the pool never grows past ``size``. An idle thread exits after ``idle_seconds``.
    """

    def __init__(self, name: str, size: int, idle_seconds: float = IDLE_THREAD_SECONDS) -> None:
        self.name, self.size, self.idle_seconds = name, size, idle_seconds
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0  # alive
        self._busy = 0  # jobs queued or running, abandoned ones included; never more than size

    @property
    def held(self) -> int:
        """Threads held by a call, finished or not waited for."""
        with self._lock:
            return self._busy

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def try_start(self, call: Callable[[], Any], wake: threading.Event) -> _Job | None:
        """Run ``call`` on a free thread (``wake`` is set when it returns); None when every thread is held."""
        with self._lock:
            if self._busy >= self.size:
                return None
            self._busy += 1
            if self._threads < self._busy:  # every thread has a job: this one needs a new thread
                self._threads += 1
                threading.Thread(target=self._work, daemon=True, name=f"reward-{self.name}-{self._threads}").start()
        job = _Job(call, wake)
        self._jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._threads > self._busy:  # no job is on its way to this thread
                        self._threads -= 1
                        return
                continue
            try:
                job.result = job.call()
            except BaseException as err:  # whatever a reward raises is its result, never the thread's end
                job.result = _Outcome(kind="errors", error=err)
            with self._lock:
                self._busy -= 1
            job.finished = True
            job.wake.set()


def run_with_timeouts(threads: RewardThreads, calls: Sequence[Callable[[], Any]], timeout: float) -> list[Any]:
    """Each call's raw value, or an _Outcome for a raise or a timeout; each call gets ``timeout`` seconds from its
    start, ``threads.size`` at a time. When every thread is held by a call that timed out earlier (and has not
    returned), the calls left fail at once as timeouts: no waiting, no new threads."""
    results: list[Any] = [None] * len(calls)
    pending = collections.deque(range(len(calls)))
    running: dict[int, tuple[_Job, float]] = {}
    wake = threading.Event()
    while pending or running:
        while pending:
            job = threads.try_start(calls[pending[0]], wake)
            if job is None:
                break
            running[pending.popleft()] = (job, time.monotonic() + timeout)
        if not running:
            stuck = _Outcome(kind="timeouts", detail=f"was not called: all {threads.size} threads of this reward are "
                                                     "still held by calls that timed out earlier")
            for i in pending:
                results[i] = stuck
            break
        wake.wait(max(0.0, min(deadline for _, deadline in running.values()) - time.monotonic()))
        wake.clear()  # after the wait, before the scan: a call that returns during the scan sets it again
        now = time.monotonic()
        for i, (job, deadline) in list(running.items()):
            if job.finished:
                results[i] = job.result
            elif now >= deadline:  # abandoned: it keeps its thread until it returns, and its result is ignored
                results[i] = _Outcome(kind="timeouts", detail=f"timed out after {timeout:g} s")
            else:
                continue
            del running[i]
    return results


async def _gather_with_timeouts(calls: Sequence[Callable[[], Any]], timeout: float) -> list[Any]:
    async def one(call: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wait_for(call(), timeout)
        except asyncio.TimeoutError:
            return _Outcome(kind="timeouts", detail=f"timed out after {timeout:g} s")
        except Exception as err:  # the call itself may raise (a wrong argument) before there is a coroutine
            return _Outcome(kind="errors", error=err)

    return list(await asyncio.gather(*(one(c) for c in calls)))


def _event_loop(calls: Sequence[Callable[[], Any]], timeout: float) -> list[Any]:
    """Run coroutine calls on a private event loop (in a pool thread: safe inside a caller's running loop)."""
    return asyncio.run(_gather_with_timeouts(calls, timeout))


class RewardComposer:
    """Scores a :class:`RewardBatch` with a weighted sum of registered rewards, isolating every failure."""

    def __init__(self, terms: Sequence[RewardTerm | str], *, timeout: float = 30.0, workers: int = 8) -> None:
        """``timeout``: seconds per call for rewards that set none (the term's, then the reward's own, come first).
        ``workers``: threads, at most, for each per-sample sync reward, for the composer's life (batched and async
        rewards, called once per batch, get one)."""
        if not terms:
            raise InputError(f"at least one reward is needed; registered rewards: {', '.join(REWARDS.names())}")
        if timeout <= 0 or workers < 1:
            raise InputError(f"timeout must be > 0 and workers >= 1, got timeout={timeout}, workers={workers}")
        self.terms = [RewardTerm(t) if isinstance(t, str) else t for t in terms]
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise InputError(f"each reward may appear once in a composition, got {names}")
        self.functions: dict[str, RewardFunction] = {}
        for term in self.terms:
            if term.on_failure not in ("drop", "fallback"):
                raise InputError(f"reward {term.name!r}: on_failure must be 'drop' or 'fallback', got "
                                 f"{term.on_failure!r}")
            if not math.isfinite(term.weight) or not math.isfinite(term.fallback):
                raise InputError(f"reward {term.name!r}: weight and fallback must be finite numbers")
            fn = REWARDS.get(term.name)
            fn.check_options(term.options)
            self.functions[term.name] = fn
        self.timeout, self.workers = timeout, workers
        self.threads = {name: RewardThreads(name, self._pool_size(self.functions[name])) for name in names}
        self._logged: set[tuple[str, str]] = set()

    def _pool_size(self, fn: RewardFunction) -> int:
        # a batched or async reward is called once per batch: a second thread would only run a call beside one that
        # has not returned (two reward-model forwards at once); a held thread makes the next batches fail at once
        return 1 if fn.batched or fn.is_async else self.workers

    def score(self, batch: RewardBatch) -> RewardScores:
        """Score every completion; never raises because of a reward's behaviour."""
        size = len(batch)
        total = torch.zeros(size, dtype=torch.float64)
        valid = torch.ones(size, dtype=torch.bool)
        per_reward: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        failures: dict[str, str] = {}
        for term in self.terms:
            outcomes = self._evaluate(self.functions[term.name], term, batch)
            raw = torch.tensor([o.value if o.kind is None else math.nan for o in outcomes], dtype=torch.float64)
            failed = torch.tensor([o.kind is not None for o in outcomes], dtype=torch.bool)
            per_reward[term.name] = raw
            used = torch.where(failed, torch.full_like(raw, term.fallback), raw)
            if term.on_failure == "drop":
                valid &= ~failed
            total += term.weight * used
            metrics.update(self._term_metrics(term.name, raw, outcomes))
            first = next((o for o in outcomes if o.kind in MALFUNCTIONS), None)
            if first is not None:
                failures[term.name] = first.describe()
        valid &= torch.isfinite(total)  # finite terms whose sum is not (several near 1e308): nothing to train on
        total = torch.where(valid, total, torch.full_like(total, math.nan))
        metrics.update(_totals(total, valid))
        return RewardScores(total=total, valid=valid, per_reward=per_reward, metrics=metrics, failures=failures)

    def _evaluate(self, fn: RewardFunction, term: RewardTerm, batch: RewardBatch) -> list[_Outcome]:
        timeout = term.timeout or fn.timeout or self.timeout
        calls = self._calls(fn, term, batch)
        threads = self.threads[term.name]
        if fn.is_async:
            [gathered] = run_with_timeouts(threads, [functools.partial(_event_loop, calls, timeout)],
                                           timeout + LOOP_GRACE_SECONDS)
            raw = gathered if isinstance(gathered, list) else [gathered] * len(calls)
        else:
            raw = run_with_timeouts(threads, calls, timeout)
        if fn.batched:
            outcomes = self._unpack_batch(raw[0], len(batch))
        else:
            outcomes = [r if isinstance(r, _Outcome) else _to_float(r) for r in raw]
        outcomes = [_weighable(o, term.weight) for o in outcomes]
        for outcome in outcomes:
            if outcome.kind is not None:
                self._log_once(term.name, outcome)
        return outcomes

    @staticmethod
    def _calls(fn: RewardFunction, term: RewardTerm, batch: RewardBatch) -> list[Callable[[], Any]]:
        """One call per sample (or one per batch), each with its own copies of the data and options it takes."""

        def call(data: dict[str, Any]) -> Callable[[], Any]:
            options = {k: _private(v) for k, v in term.options.items()}
            return functools.partial(fn.fn, **{**data, **options})

        if fn.batched:
            return [call(batch.batch_kwargs(fn.accepts))]
        return [call(batch.sample_kwargs(i, fn.accepts)) for i in range(len(batch))]

    @staticmethod
    def _unpack_batch(result: Any, size: int) -> list[_Outcome]:
        if isinstance(result, _Outcome):
            return [result] * size
        values = result
        if not isinstance(values, (list, tuple)) and callable(getattr(values, "tolist", None)):
            try:
                values = values.tolist()  # a tensor or an array
            except Exception as err:
                return [_Outcome(kind="errors", detail=f"returned a {type(result).__name__} that has no list of "
                                                       f"values ({_first_line(err)})")] * size
        if not isinstance(values, (list, tuple)) or len(values) != size:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(result).__name__}"
            return [_Outcome(kind="wrong_count", detail=f"returned {got} for {size} completions")] * size
        return [_to_float(v) for v in values]

    def _log_once(self, name: str, outcome: _Outcome) -> None:
        assert outcome.kind is not None
        key = (name, outcome.kind)
        if key in self._logged:
            return
        self._logged.add(key)
        error = outcome.error
        logger.warning("reward %r %s (logged once; counted in reward/%s/%s)", name, outcome.describe(), name,
                       outcome.kind, exc_info=(type(error), error, error.__traceback__) if error is not None else None)

    @staticmethod
    def _term_metrics(name: str, raw: Tensor, outcomes: list[_Outcome]) -> dict[str, float]:
        good = raw[torch.isfinite(raw)]
        metrics = {
            f"reward/{name}/mean": float(good.mean()) if good.numel() else math.nan,
            f"reward/{name}/std": float(good.std()) if good.numel() > 1 else 0.0,
        }
        for kind in FAILURE_KINDS:
            metrics[f"reward/{name}/{kind}"] = float(sum(o.kind == kind for o in outcomes))
        metrics[f"reward/{name}/failed"] = float(sum(o.kind in MALFUNCTIONS for o in outcomes))
        return metrics
