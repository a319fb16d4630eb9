"""Weighted composition of rewards with fault isolation.

A reward that raises, hangs past its timeout, or returns NaN, inf, None, a non-number or the wrong number of values
never stops training: the affected samples get the term's policy (``"drop"``: the sample leaves the batch;
``"fallback"``: it gets a fixed value), every case is counted in the metrics (``reward/<name>/errors``,
``.../timeouts``, ``.../nonfinite``, ``.../none``, ``.../wrong_count``), and the first traceback of each kind is
logged once per reward, not once per sample.

Timeouts: per call (one sample, or one batch for batched rewards). An ``async`` reward is cancelled. A sync reward
cannot be interrupted from Python: it is abandoned in a daemon thread and its late result is ignored. Rewards that
may hang on untrusted input (running generated code) should use :mod:`rewards.sandbox`, which kills a process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
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

    def sample_kwargs(self, i: int) -> dict[str, Any]:
        kw: dict[str, Any] = {k: v[i] for k, v in self.columns.items()}
        kw.update(prompt=self.prompts[i], completion=self.completions[i], completion_ids=self.completion_ids[i],
                  step=self.step)
        return kw

    def batch_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {k: list(v) for k, v in self.columns.items()}
        kw.update(prompts=list(self.prompts), completions=list(self.completions),
                  completion_ids=[list(c) for c in self.completion_ids], step=self.step)
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


def _totals(total: Tensor, valid: Tensor) -> dict[str, float]:
    return {"reward/total/mean": float(total[valid].mean()) if bool(valid.any()) else math.nan,
            "reward/dropped": float((~valid).sum())}


def merge_scores(parts: Sequence[RewardScores]) -> RewardScores:
    """Scores of consecutive shards of one batch (a reward pool's workers), as if scored at once."""
    total = torch.cat([p.total for p in parts])
    valid = torch.cat([p.valid for p in parts])
    per_reward = {name: torch.cat([p.per_reward[name] for p in parts]) for name in parts[0].per_reward}
    metrics: dict[str, float] = {}
    for name, raw in per_reward.items():
        good = raw[torch.isfinite(raw)]
        metrics[f"reward/{name}/mean"] = float(good.mean()) if good.numel() else math.nan
        metrics[f"reward/{name}/std"] = float(good.std()) if good.numel() > 1 else 0.0
        for kind in FAILURE_KINDS:
            metrics[f"reward/{name}/{kind}"] = sum(p.metrics[f"reward/{name}/{kind}"] for p in parts)
    return RewardScores(total=total, valid=valid, per_reward=per_reward, metrics={**metrics, **_totals(total, valid)})


@dataclass
class _Outcome:
    value: float | None = None
    kind: str | None = None  # one of FAILURE_KINDS, None when the value is good
    error: BaseException | None = None


def _to_float(value: Any) -> _Outcome:
    if value is None:
        return _Outcome(kind="none")
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            problem = TypeError(f"reward returned {type(value).__name__}, not a number: {err}")
            return _Outcome(kind="errors", error=problem)
    else:
        number = float(value)
    return _Outcome(value=number) if math.isfinite(number) else _Outcome(kind="nonfinite")


def _call_with_timeouts(calls: list[Callable[[], Any]], timeout: float, workers: int) -> list[_Outcome | Any]:
    """Run sync calls in daemon threads, ``workers`` at a time; each call gets ``timeout`` seconds from its start.

    Returns the raw value per call, or an _Outcome for errors and timeouts.
    """
    results: list[Any] = [None] * len(calls)
    done = [False] * len(calls)
    lock = threading.Lock()

    def target(i: int) -> None:
        try:
            value: Any = calls[i]()
        except BaseException as err:
            value = _Outcome(kind="errors", error=err)
        with lock:
            if not done[i]:
                results[i], done[i] = value, True

    pending = list(range(len(calls)))
    running: dict[int, tuple[threading.Thread, float]] = {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            thread = threading.Thread(target=target, args=(i,), daemon=True, name=f"reward-{i}")
            running[i] = (thread, time.monotonic() + timeout)
            thread.start()
        next_deadline = min(deadline for _, deadline in running.values())
        first = next(iter(running))
        running[first][0].join(max(0.0, min(next_deadline - time.monotonic(), 0.05)))
        now = time.monotonic()
        for i, (_, deadline) in list(running.items()):
            with lock:
                if done[i]:
                    del running[i]
                elif now >= deadline:
                    results[i], done[i] = _Outcome(kind="timeouts"), True  # abandoned: late results are ignored
                    del running[i]
    return results


async def _gather_with_timeouts(coros: list[Any], timeout: float) -> list[Any]:
    async def one(coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            return _Outcome(kind="timeouts")
        except Exception as err:
            return _Outcome(kind="errors", error=err)

    return await asyncio.gather(*(one(c) for c in coros))


def _run_async(coros: list[Any], timeout: float) -> list[Any]:
    """Run coroutines on a private event loop in a helper thread (safe inside a caller's running loop)."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(_gather_with_timeouts(coros, timeout))),
                              daemon=True)
    thread.start()
    # wait_for cannot pre-empt a coroutine that blocks the loop (time.sleep, a busy loop): bound the wait anyway
    thread.join(timeout + 1.0)
    if not box:
        return [_Outcome(kind="timeouts") for _ in coros]  # the loop thread is abandoned
    results: list[Any] = box[0]
    return results


class RewardComposer:
    """Scores a :class:`RewardBatch` with a weighted sum of registered rewards, isolating every failure."""

    def __init__(self, terms: Sequence[RewardTerm | str], *, timeout: float = 30.0, workers: int = 8) -> None:
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
        self._logged: set[tuple[str, str]] = set()

    def score(self, batch: RewardBatch) -> RewardScores:
        """Score every completion; never raises because of a reward's behaviour."""
        size = len(batch)
        total = torch.zeros(size, dtype=torch.float64)
        valid = torch.ones(size, dtype=torch.bool)
        per_reward: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
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
        total = torch.where(valid, total, torch.full_like(total, math.nan))
        metrics.update(_totals(total, valid))
        return RewardScores(total=total, valid=valid, per_reward=per_reward, metrics=metrics)

    def _evaluate(self, fn: RewardFunction, term: RewardTerm, batch: RewardBatch) -> list[_Outcome]:
        timeout = term.timeout or fn.timeout or self.timeout

        def kwargs(data: dict[str, Any]) -> dict[str, Any]:
            picked = {k: v for k, v in data.items() if fn.accepts(k)}
            return {**picked, **term.options}

        if fn.batched:
            calls: list[Callable[[], Any]] = [functools.partial(self._call, fn, kwargs(batch.batch_kwargs()))]
        else:
            calls = [functools.partial(self._call, fn, kwargs(batch.sample_kwargs(i))) for i in range(len(batch))]
        if fn.is_async:
            raw = _run_async([call() for call in calls], timeout)
        else:
            raw = _call_with_timeouts(calls, timeout, 1 if fn.batched else self.workers)
        outcomes = self._unpack(fn, raw, len(batch))
        for outcome in outcomes:
            if outcome.kind is not None:
                self._log_once(term.name, outcome)
        return outcomes

    @staticmethod
    def _call(fn: RewardFunction, kwargs: dict[str, Any]) -> Any:
        return fn.fn(**kwargs)

    @staticmethod
    def _unpack(fn: RewardFunction, raw: list[Any], size: int) -> list[_Outcome]:
        if not fn.batched:
            return [r if isinstance(r, _Outcome) else _to_float(r) for r in raw]
        result = raw[0]
        if isinstance(result, _Outcome):
            return [result] * size
        if isinstance(result, Tensor):
            result = result.tolist()
        if not isinstance(result, (list, tuple)) or len(result) != size:
            got = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
            error = ValueError(f"batched reward returned {got} values for {size} completions")
            return [_Outcome(kind="wrong_count", error=error)] * size
        return [_to_float(r) for r in result]

    def _log_once(self, name: str, outcome: _Outcome) -> None:
        assert outcome.kind is not None
        key = (name, outcome.kind)
        if key in self._logged:
            return
        self._logged.add(key)
        what = {"errors": "raised", "timeouts": "timed out", "nonfinite": "returned NaN or inf", "none":
                "returned None", "wrong_count": "returned the wrong number of values"}[outcome.kind]
        error = outcome.error
        logger.warning("reward %r %s (logged once; counted in reward/%s/%s)", name, what, name, outcome.kind,
                       exc_info=(type(error), error, error.__traceback__) if error is not None else None)

    @staticmethod
    def _term_metrics(name: str, raw: Tensor, outcomes: list[_Outcome]) -> dict[str, float]:
        good = raw[torch.isfinite(raw)]
        metrics = {
            f"reward/{name}/mean": float(good.mean()) if good.numel() else math.nan,
            f"reward/{name}/std": float(good.std()) if good.numel() > 1 else 0.0,
        }
        for kind in FAILURE_KINDS:
            metrics[f"reward/{name}/{kind}"] = float(sum(o.kind == kind for o in outcomes))
        return metrics
