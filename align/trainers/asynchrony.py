"""Asynchronous rollouts with a staleness bound: generation batches started ahead of the step that trains on them.

With ``runtime.max_staleness`` k (``runtime.overlap: true`` is k = 1) the policy workload
(:class:`~align.trainers.workload.PolicyWorkload`) keeps up to k generation batches in flight, first in first out:
each step trains on the oldest and starts one more before its update, so a batch started at policy version v is
trained at version v + k at the latest. A row's lag is the current version minus the oldest version that sampled
any of its trainable tokens (:meth:`Rollout.row_versions`), as AReaL's ``max_head_offpolicyness`` and prime-rl's
``async_level`` count it; rows past the bound are dropped before they are scored (counted, never silently).

**Partial rollouts** (:class:`Chunked`; AReaL's interruptible generation, Kimi k1.5's and verl's partial rollouts):
a batch in flight is sampled a chunk of tokens at a time through the engine's token-in, token-out
``generate_tokens``, one chunk per weight version, so a completion started under old weights continues under newer
ones instead of being sampled whole by the oldest. Every token keeps the version that sampled it
(:attr:`Rollout.token_versions`) and its log-prob under that version: the behaviour policy the learner's
importance weights divide by. When a step takes a batch, what is left of it is sampled at the current weights.
Decision: the rows of a batch advance together (one call per chunk), so a batch stays one unit of the queue.

**Checkpoints**: :meth:`Generation.state_dict` resolves a batch (a call being sampled finishes at the version it
started at; nothing is re-sampled at newer weights) and stores it: the finished rollout, or the prompts, the tokens
so far, their log-probs and versions. The uninterrupted run goes on from exactly what was stored, as a resumed run
does, so no sample is lost or trained twice, and checkpointing never changes what a run trains on. (The usual
failure elsewhere: a checkpoint saves the data cursor past the batches in flight and drops them on resume.)

**Runtimes**: on Ray the engine's ``submit`` / ``submit_tokens`` return at once and the rollout worker samples while
the learners train; the worker runs calls in order, so a call submitted before a weight sync samples the weights
before it. Locally each call runs when it is made. Both label every token with the same version.

Shapes: B rows (prompts x samples per prompt), T response tokens, P prompt tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from align.errors import InputError
from align.trainers.protocols import Rollout, SamplingParams, TokenSamples
from align.trainers.resampling import LongHorizonPending
from align.trainers.sequences import encode, pad_left, pad_right


class Ready:
    """A result already computed (engines without ``submit``, as on the local runtime)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def chunk_seed(seed: int, call: int) -> int:
    """The seed of a batch's ``call``-th engine call (0 the first), from the batch's own seed: no RNG is drawn, so a
    resumed run and an uninterrupted one seed every chunk alike. Spread apart because vLLM seeds row i with
    seed + i."""
    return (seed * 1_000_003 + call * 0x9E3779B1) % (2**31 - 1)


class Chunked:
    """A generation batch sampled a chunk at a time (partial rollouts), token in and token out.

    Rows (B = prompts x ``samples_per_prompt``, a prompt's samples contiguous) advance together: each call continues
    every open row (no EOS yet, under ``params.max_new_tokens``) by up to ``chunk_tokens`` tokens at the engine's
    current weights. ``engine`` has ``generate_tokens`` and, to sample without waiting (Ray), ``submit_tokens``."""

    def __init__(self, engine: Any, tokenizer: Any, *, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]],
                 samples_per_prompt: int, params: SamplingParams, seed: int, chunk_tokens: int,
                 prompt_ids: list[list[int]] | None = None) -> None:
        if not hasattr(engine, "generate_tokens"):
            raise InputError(f"runtime.partial_rollouts: the rollout engine {type(engine).__name__} cannot continue "
                             "token ids (no generate_tokens); use rollout.engine hf or vllm, or remove "
                             "partial_rollouts")
        if chunk_tokens < 1:
            raise InputError(f"partial rollouts need chunk_tokens >= 1, got {chunk_tokens}")
        self.engine, self.tokenizer = engine, tokenizer
        self.prompts, self.columns = list(prompts), {k: list(v) for k, v in columns.items()}
        self.samples_per_prompt, self.params, self.seed = samples_per_prompt, params, seed
        self.chunk_tokens = chunk_tokens
        self.prompt_ids = prompt_ids if prompt_ids is not None else \
            [ids for ids in encode(tokenizer, self.prompts) for _ in range(samples_per_prompt)]
        rows = len(self.prompt_ids)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.logp: list[list[float]] = [[] for _ in range(rows)]
        self.versions: list[list[int]] = [[] for _ in range(rows)]  # the policy version of each token
        self.finished = [False] * rows  # ended with EOS
        self.calls = 0  # engine calls made, for their seeds
        self.seconds = 0.0  # generation time, as the engine measured it where it could
        self._pending: tuple[Any, list[int], float] | None = None  # (pending samples, their rows, when submitted)

    def __len__(self) -> int:
        return len(self.tokens)

    def open_rows(self) -> list[int]:
        """Rows still to be continued: no EOS and under the token budget."""
        budget = self.params.max_new_tokens
        return [i for i, (ids, done) in enumerate(zip(self.tokens, self.finished, strict=True))
                if not done and len(ids) < budget]

    def advance(self) -> None:
        """Continue the open rows by one chunk at the engine's current weights (without waiting, where the engine
        can submit)."""
        self._call(self.chunk_tokens)

    def finish(self) -> None:
        """Sample what is left of the open rows at the engine's current weights (without waiting, where it can)."""
        self._call(None)

    def resolve(self) -> None:
        """Wait for the call being sampled, if any, and append its tokens to their rows."""
        if self._pending is None:
            return
        pending, rows, submitted = self._pending
        self._pending = None
        samples: TokenSamples = pending.result()
        self.seconds += samples.timings.get("generate", time.perf_counter() - submitted)
        for j, i in enumerate(rows):
            ids = list(samples.token_ids[j])
            self.tokens[i] += ids
            self.logp[i] += [float(x) for x in samples.logp[j]]
            self.versions[i] += [int(samples.weight_version)] * len(ids)
            self.finished[i] = bool(samples.finished[j]) or not ids  # no token: nothing more will come

    def _call(self, limit: int | None) -> None:
        self.resolve()
        rows = self.open_rows()
        if not rows:
            return
        left = min(self.params.max_new_tokens - len(self.tokens[i]) for i in rows)
        inputs = [self.prompt_ids[i] + self.tokens[i] for i in rows]
        params = replace(self.params, max_new_tokens=left if limit is None else min(limit, left))
        seed = chunk_seed(self.seed, self.calls)
        self.calls += 1
        submitted = time.perf_counter()
        submit = getattr(self.engine, "submit_tokens", None)
        pending = (submit(inputs, params=params, seed=seed) if submit is not None else
                   Ready(self.engine.generate_tokens(inputs, params=params, seed=seed)))
        self._pending = (pending, rows, submitted)

    def rollout(self) -> Rollout:
        """The finished batch: every open row sampled to its end at the engine's current weights."""
        self.resolve()
        while self.open_rows():
            self.finish()
            self.resolve()
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = pad_left(self.prompt_ids, pad)
        completion_ids, mask = pad_right(self.tokens, pad)
        width = completion_ids.shape[1]
        logp = torch.tensor([row + [0.0] * (width - len(row)) for row in self.logp], dtype=torch.float32)
        versions = torch.tensor([row + [0] * (width - len(row)) for row in self.versions], dtype=torch.long)
        n = self.samples_per_prompt
        return Rollout(
            prompts=[p for p in self.prompts for _ in range(n)],
            completions=list(self.tokenizer.batch_decode(self.tokens, skip_special_tokens=True)),
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, mask=mask,
            logp=logp * mask, group_ids=torch.arange(len(self.prompts)).repeat_interleave(n),
            weight_version=min((v for row in self.versions for v in row), default=0),
            columns={k: [v[i] for i in range(len(self.prompts)) for _ in range(n)] for k, v in self.columns.items()},
            timings={"generate": self.seconds}, token_versions=versions)

    def state_dict(self) -> dict[str, Any]:
        """Everything sampled so far (the call in flight waited for), as JSON values and tensors."""
        self.resolve()
        prompt_ids, prompt_mask = pad_left(self.prompt_ids, 0)
        width = max((len(t) for t in self.tokens), default=0)
        return {
            "prompts": self.prompts, "columns": self.columns, "samples_per_prompt": self.samples_per_prompt,
            "params": asdict(self.params), "seed": self.seed, "chunk_tokens": self.chunk_tokens,
            "calls": self.calls, "seconds": self.seconds, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "lengths": torch.tensor([len(t) for t in self.tokens], dtype=torch.long),
            "tokens": pad_right(self.tokens, 0, width)[0],
            "logp": torch.tensor([row + [0.0] * (width - len(row)) for row in self.logp], dtype=torch.float64),
            "versions": torch.tensor([row + [0] * (width - len(row)) for row in self.versions], dtype=torch.long),
            "finished": torch.tensor(self.finished, dtype=torch.bool),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], engine: Any, tokenizer: Any) -> Chunked:
        prompt_ids = [row[m != 0].tolist() for row, m in zip(state["prompt_ids"], state["prompt_mask"], strict=True)]
        chunked = cls(engine, tokenizer, prompts=state["prompts"], columns=state["columns"],
                      samples_per_prompt=int(state["samples_per_prompt"]), params=SamplingParams(**state["params"]),
                      seed=int(state["seed"]), chunk_tokens=int(state["chunk_tokens"]), prompt_ids=prompt_ids)
        lengths = state["lengths"].tolist()
        chunked.tokens = [row[:n].tolist() for row, n in zip(state["tokens"], lengths, strict=True)]
        chunked.logp = [row[:n].tolist() for row, n in zip(state["logp"], lengths, strict=True)]
        chunked.versions = [row[:n].tolist() for row, n in zip(state["versions"], lengths, strict=True)]
        chunked.finished = state["finished"].tolist()
        chunked.calls, chunked.seconds = int(state["calls"]), float(state["seconds"])
        return chunked


class Generation:
    """One generation batch, from its start to the :class:`Rollout` a step trains on: whole (the engine's pending
    rollout) or :class:`Chunked`. With long-horizon temperature (``resample``: LongHorizonPending's temperature,
    samples_per_prompt and seed) the engine's candidates are resampled when the batch is taken; ``metrics`` are
    set then. ``on_result(rows)`` is told when a step takes it."""

    def __init__(self, *, rows: int, pending: Any = None, chunked: Chunked | None = None,
                 resample: dict[str, Any] | None = None, on_result: Callable[[int], None] | None = None) -> None:
        if (pending is None) == (chunked is None):
            raise ValueError("a generation batch is either whole (pending) or chunked")
        self.rows = rows  # completions it yields
        self.pending, self.chunked, self.resample, self.on_result = pending, chunked, resample, on_result
        self.metrics: dict[str, float] = {}

    def advance(self) -> None:
        """Partial rollouts: one more chunk at the engine's current weights (whole batches: nothing)."""
        if self.chunked is not None:
            self.chunked.advance()

    def finish(self) -> None:
        """Partial rollouts: start sampling what is left at the engine's current weights, before anything submitted
        later (whole batches: nothing)."""
        if self.chunked is not None:
            self.chunked.finish()

    def result(self) -> Rollout:
        """The finished batch (what is left sampled at the engine's current weights)."""
        rollout: Rollout = self.chunked.rollout() if self.chunked is not None else self.pending.result()
        if self.resample is not None:
            resampled = LongHorizonPending(Ready(rollout), **self.resample)
            rollout, self.metrics = resampled.result(), resampled.metrics
        if self.on_result is not None:
            self.on_result(self.rows)
        return rollout

    def state_dict(self) -> dict[str, Any]:
        """The batch as far as it is sampled, with nothing left in flight; the batch goes on from exactly this (a
        whole batch from its stored rollout), as one restored from it does."""
        if self.chunked is not None:
            return {"rows": self.rows, "partial": self.chunked.state_dict()}
        rollout: Rollout = self.pending.result()
        self.pending = Ready(rollout)
        return {"rows": self.rows, "rollout": rollout_state(rollout), "resample": self.resample}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, engine: Any, tokenizer: Any,
                   on_result: Callable[[int], None] | None = None) -> Generation:
        if "partial" in state:
            return cls(rows=int(state["rows"]), chunked=Chunked.from_state(state["partial"], engine, tokenizer),
                       on_result=on_result)
        return cls(rows=int(state["rows"]), pending=Ready(rollout_from_state(state["rollout"])),
                   resample=state["resample"], on_result=on_result)


def rollout_state(rollout: Rollout) -> dict[str, Any]:
    """A rollout as JSON values and tensors (:func:`~align.trainers.checkpoint.save_checkpoint` stores tensors
    beside ``state.json``)."""
    return {"prompts": list(rollout.prompts), "completions": list(rollout.completions),
            "prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "completion_ids": rollout.completion_ids, "mask": rollout.mask, "logp": rollout.logp,
            "group_ids": rollout.group_ids, "weight_version": rollout.weight_version,
            "columns": {k: list(v) for k, v in rollout.columns.items()}, "timings": dict(rollout.timings),
            "token_versions": rollout.token_versions}


def rollout_from_state(state: Mapping[str, Any]) -> Rollout:
    return Rollout(prompts=list(state["prompts"]), completions=list(state["completions"]),
                   prompt_ids=state["prompt_ids"], prompt_mask=state["prompt_mask"],
                   completion_ids=state["completion_ids"], mask=state["mask"], logp=state["logp"],
                   group_ids=state["group_ids"], weight_version=int(state["weight_version"]),
                   columns={k: list(v) for k, v in state["columns"].items()}, timings=dict(state["timings"]),
                   token_versions=state["token_versions"])


def staleness_metrics(rollout: Rollout, version: int, bound: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Which rows are within ``bound`` versions of ``version`` ((B,) bool), and what the batch's versions show:
    ``async/staleness_mean`` / ``_max`` (per row, over every row drawn), ``async/stale_dropped_frac`` (rows past the
    bound), and over the rows within it ``async/token_staleness_mean`` (per trainable token: below the row mean
    when partial rollouts continued rows under newer weights) and ``async/partial_rows_frac`` (rows whose tokens
    span more than one version)."""
    lags = version - rollout.row_versions()  # (B,)
    fresh = lags <= bound
    metrics = {"async/staleness_mean": float(lags.float().mean()) if len(lags) else 0.0,
               "async/staleness_max": float(lags.max()) if len(lags) else 0.0,
               "async/stale_dropped_frac": float((~fresh).float().mean()) if len(lags) else 0.0}
    mask = rollout.mask[fresh] != 0
    versions = (rollout.token_versions[fresh] if rollout.token_versions is not None else
                torch.full(mask.shape, rollout.weight_version, dtype=torch.long))
    metrics["async/token_staleness_mean"] = float((version - versions)[mask].float().mean()) if bool(mask.any()) \
        else 0.0
    big = torch.iinfo(torch.long).max
    newest = torch.where(mask, versions, -big).max(-1).values if mask.numel() else torch.zeros(0, dtype=torch.long)
    oldest = torch.where(mask, versions, big).min(-1).values if mask.numel() else torch.zeros(0, dtype=torch.long)
    spans = mask.any(-1) & (newest > oldest)
    metrics["async/partial_rows_frac"] = float(spans.float().mean()) if len(spans) else 0.0
    return fresh, metrics
