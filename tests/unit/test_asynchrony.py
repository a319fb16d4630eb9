"""Asynchronous rollouts with a staleness bound (align/trainers/asynchrony.py): a FIFO of generation batches up to
``max_staleness`` versions ahead, rows past the bound dropped and counted, partial rollouts that continue in-flight
batches one chunk per weight version with every token's version recorded, and checkpoints that carry the batches in
flight so that a resumed run trains on exactly what an uninterrupted one does, every sample once."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from align.algorithms import PRESETS
from align.config import RecipeError, recipe_from_dict
from align.trainers.asynchrony import staleness_metrics
from align.trainers.checkpoint import join_tensors, load_checkpoint, save_checkpoint, split_tensors
from align.trainers.protocols import RewardResult, Rollout, SamplingParams, TokenSamples
from align.trainers.workload import Collected, PolicyWorkload

EOS, PAD = 999, 0
BASE = 1000  # a sampled token's id is BASE + the version that sampled it
SAMPLES = 2
# "<name><L>": each sample of the prompt ends with EOS as its L-th token (9: runs to the budget)
PROMPTS = [f"q{i:02d}{length}" for i, length in enumerate([9, 3, 2, 9, 5, 1, 9, 9] * 3)]


class Later:
    """A call the Ray worker runs in order: sampled at the version current when it was submitted (a weight sync
    pushed afterwards runs after it), whenever the driver asks for it."""

    def __init__(self, compute: Callable[[], Any]) -> None:
        self.compute, self.value = compute, None

    def result(self) -> Any:
        if self.value is None:
            self.value = self.compute()
        return self.value


class Tokenizer:
    pad_token_id = PAD

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(str(i) for i in row if i != EOS) for row in rows]


class Engine:
    """Token in, token out. Every sampled token is BASE + the sampling version, with log-prob -(version + 1) / 10
    minus a seed-dependent 1e-6 * (seed % 1000) (so a changed seed shows); ``ray``: ``submit`` / ``submit_tokens``
    that return at once, as the Ray rollout service does."""

    def __init__(self, ray: bool = False) -> None:
        self.weight_version = 0
        self.tokenizer = Tokenizer()
        self.calls: list[tuple[int, int, int]] = []  # (version, rows, max_new_tokens) of each token call
        self.seeds: list[int] = []
        if ray:
            self.submit = self._submit
            self.submit_tokens = self._submit_tokens

    def _sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int,
                version: int) -> TokenSamples:
        self.calls.append((version, len(prompt_ids), params.max_new_tokens))
        self.seeds.append(seed)
        ids, logp, finished = [], [], []
        for row in prompt_ids:
            length = int(chr([t for t in row if t < 256][-1]))
            done = sum(1 for t in row if t >= EOS)
            n = min(params.max_new_tokens, length - done)
            out = [BASE + version] * n
            if done + n == length:
                out[-1] = EOS
            ids.append(out)
            logp.append([-(version + 1) / 10 - 1e-6 * (seed % 1000)] * n)
            finished.append(done + n == length)
        return TokenSamples(token_ids=ids, logp=logp, finished=finished, weight_version=version)

    def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], *, params: SamplingParams,
                        seed: int | None = None) -> TokenSamples:
        return self._sample(prompt_ids, params, seed or 0, self.weight_version)

    def _submit_tokens(self, prompt_ids: Sequence[Sequence[int]], *, params: SamplingParams, seed: int) -> Later:
        version = self.weight_version
        return Later(lambda: self._sample(prompt_ids, params, seed, version))

    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams, seed: int | None = None) -> Rollout:
        return self._whole(prompts, columns, samples_per_prompt, params, seed or 0, self.weight_version)

    def _submit(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                params: SamplingParams, seed: int) -> Later:
        version = self.weight_version
        return Later(lambda: self._whole(prompts, columns, samples_per_prompt, params, seed, version))

    def _whole(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], n: int, params: SamplingParams,
               seed: int, version: int) -> Rollout:
        rows = [[ord(c) for c in p] for p in prompts for _ in range(n)]
        out = self._sample(rows, params, seed, version)
        width = max(len(r) for r in out.token_ids)
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in out.token_ids])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in out.token_ids])
        logp = torch.tensor([r + [0.0] * (width - len(r)) for r in out.logp])
        return Rollout(prompts=[p for p in prompts for _ in range(n)], completions=Tokenizer().batch_decode(
                           out.token_ids), prompt_ids=torch.tensor(rows), prompt_mask=torch.ones(len(rows), 4),
                       completion_ids=ids, mask=mask, logp=logp,
                       group_ids=torch.arange(len(prompts)).repeat_interleave(n), weight_version=version,
                       columns={k: [v[i] for i in range(len(prompts)) for _ in range(n)] for k, v in columns.items()})


class InOrder:
    """Prompts in list order, never wrapping: the trained prompts show which batch was trained when."""

    def __init__(self) -> None:
        self.position = 0

    def next(self, n: int) -> list[int]:
        self.position += n
        return list(range(self.position - n, self.position))

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def score(rollout: Rollout, step: int) -> RewardResult:
    values = torch.tensor([float(len(c) % 3) for c in rollout.completions], dtype=torch.float64)
    return RewardResult(rewards=values, valid=torch.ones(len(values), dtype=torch.bool), per_reward={"r": values},
                        metrics={})


def workload(engine: Engine, *, staleness: int, chunk: int | None = None, budget: int = 6,
             **options: Any) -> PolicyWorkload:
    spec = PRESETS.get("grpo").with_options(kl=None, kl_coef=0.0)  # no reference forward: no learner needed
    return PolicyWorkload(spec=spec, engine=engine, rewards=score, learner=None,  # type: ignore[arg-type]
                          prompts=PROMPTS, columns={"answer": list(range(len(PROMPTS)))},
                          sampler=InOrder(), prompts_per_step=2,  # type: ignore[arg-type]
                          samples_per_prompt=SAMPLES, sampling=SamplingParams(max_new_tokens=budget),
                          max_staleness=staleness, partial_chunk_tokens=chunk, tokenizer=engine.tokenizer, **options)


def train(work: PolicyWorkload, engine: Engine, steps: int, start: int = 0, stop: int | None = None) -> list[Collected]:
    """The controller's loop over a run of ``steps`` steps without a learner, from ``start`` to ``stop``: collect
    (told how many steps are left), then the weights move on one version (a sync)."""
    out = []
    for step in range(start + 1, (stop or steps) + 1):
        out.append(work.collect(step, step - 1, steps - step))
        engine.weight_version = step
    return out


def token_versions(rollout: Rollout) -> list[list[int]]:
    versions = rollout.token_versions if rollout.token_versions is not None else \
        torch.full(rollout.mask.shape, rollout.weight_version)
    return [row[m != 0].tolist() for row, m in zip(versions, rollout.mask, strict=True)]


def prompts_trained(steps: list[Collected]) -> list[str]:
    return [p for c in steps if c.rollout is not None for p in c.rollout.prompts]


def test_a_queue_of_k_batches_trains_each_batch_k_versions_after_it_was_sampled() -> None:
    engine = Engine()
    steps = train(workload(engine, staleness=2), engine, 6)
    m = [c.metrics for c in steps]
    # step s trains at version s - 1 on the batch started at version s - 1 - lag; at most 2 ahead, none past the end
    assert [x["off_policy_lag"] for x in m] == [0, 1, 2, 2, 2, 2]
    assert [c.rollout.weight_version for c in steps if c.rollout is not None] == [0, 0, 0, 1, 2, 3]
    assert [x["async/in_flight"] for x in m] == [2, 2, 2, 2, 1, 0]
    # in data order, every prompt once: nothing skipped by sampling ahead, nothing left over
    assert prompts_trained(steps) == [p for p in PROMPTS[:12] for _ in range(SAMPLES)]
    for x in m:
        assert x["async/samples_submitted"] == x["async/samples_drawn"] + x["async/in_flight_samples"]
        assert x["async/samples_drawn"] == x["async/samples_trained"] + x["async/samples_stale_dropped"]
        assert x["async/stale_dropped_frac"] == 0.0
    assert m[-1]["async/samples_trained"] == 12 * SAMPLES


def test_overlap_is_max_staleness_one_and_an_on_policy_run_reports_nothing() -> None:
    engine = Engine()
    lags = [c.metrics["off_policy_lag"] for c in train(workload(engine, staleness=0, overlap=True), engine, 4)]
    assert lags == [0, 1, 1, 1]
    engine = Engine()
    plain = train(workload(engine, staleness=0), engine, 3)
    assert all(c.metrics["off_policy_lag"] == 0 and not any(k.startswith("async/") for k in c.metrics)
               for c in plain)


@pytest.mark.parametrize("ray", [False, True])
def test_partial_rollouts_continue_batches_in_flight_one_chunk_per_version(ray: bool) -> None:
    """Chunks of 2 of a 6-token budget, 2 versions ahead: a batch started at v gets tokens at v, v + 1, and what
    is left at v + 2 when its step takes it; rows that end (EOS) stop."""
    engine = Engine(ray=ray)
    steps = train(workload(engine, staleness=2, chunk=2), engine, 5)
    third = steps[2]  # version 2: the batch of prompts 4 and 5, started at version 0
    assert third.rollout is not None
    assert third.rollout.prompts == [PROMPTS[4]] * SAMPLES + [PROMPTS[5]] * SAMPLES  # "q045", "q051"
    assert token_versions(third.rollout) == [[0, 0, 1, 1, 2]] * SAMPLES + [[0]] * SAMPLES
    assert third.rollout.completion_ids[0, :5].tolist() == [BASE, BASE, BASE + 1, BASE + 1, EOS]
    # each token's log-prob is the one of the version that sampled it: what the importance weights divide by
    logp = third.rollout.logp[0, :5]
    torch.testing.assert_close(logp, -(torch.tensor([0, 0, 1, 1, 2.0]) + 1) / 10, rtol=0, atol=1e-3)
    m = third.metrics
    assert m["off_policy_lag"] == 2 and m["async/staleness_mean"] == 2.0
    assert m["async/partial_rows_frac"] == 0.5  # prompt 5's rows ended in their first chunk
    assert m["async/token_staleness_mean"] == pytest.approx((2 * (2 + 2 + 1 + 1 + 0) + 2 * 2) / 12)
    fourth = steps[3].rollout  # version 3: prompts 6 and 7 (both run to the budget), started at version 1
    assert fourth is not None and token_versions(fourth) == [[1, 1, 2, 2, 3, 3]] * (2 * SAMPLES)
    assert fourth.completions[0] == " ".join(str(t) for t in [1001, 1001, 1002, 1002, 1003, 1003])
    assert fourth.columns["answer"] == [6, 6, 7, 7]
    # every call samples with a seed of its own: a chunk never replays the random draws of an earlier one
    assert len(engine.seeds) > 10 and len(set(engine.seeds)) == len(engine.seeds)


def test_the_default_chunk_finishes_a_batch_before_its_step_takes_it() -> None:
    """max_new_tokens / max_staleness per version: k chunks while in flight, so the step never waits on sampling
    (recipe default, runtime.partial_chunk_tokens unset)."""
    engine = Engine()
    recipe = recipe_from_dict({"rewards": [{"name": "exact_match"}], "rollout": {"max_new_tokens": 6},
                               "runtime": {"max_staleness": 2, "partial_rollouts": True}})
    chunk = recipe.runtime.chunk_tokens(recipe.rollout.max_new_tokens)
    assert chunk == 3
    steps = train(workload(engine, staleness=2, chunk=chunk), engine, 5)
    fourth = steps[3].rollout
    assert fourth is not None and token_versions(fourth) == [[1, 1, 1, 2, 2, 2]] * (2 * SAMPLES)
    assert all(rows and max_tokens <= 3 for _, rows, max_tokens in engine.calls)


def test_staleness_is_counted_per_row_from_its_oldest_trainable_token_and_rows_past_the_bound_drop() -> None:
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1]])
    versions = torch.tensor([[3, 3, 4], [1, 2, 0], [2, 2, 2]])  # row 1's padding (0) is no token
    rollout = Rollout(prompts=["a"] * 3, completions=["x"] * 3, prompt_ids=torch.ones(3, 1, dtype=torch.long),
                      prompt_mask=torch.ones(3, 1), completion_ids=torch.ones(3, 3, dtype=torch.long), mask=mask,
                      logp=torch.zeros(3, 3), group_ids=torch.arange(3), weight_version=1, token_versions=versions)
    fresh, m = staleness_metrics(rollout, version=4, bound=2)
    assert fresh.tolist() == [True, False, True]  # lags 1, 3, 2
    assert m["async/staleness_mean"] == 2.0 and m["async/staleness_max"] == 3.0
    assert m["async/stale_dropped_frac"] == pytest.approx(1 / 3)
    assert m["async/token_staleness_mean"] == pytest.approx((1 + 1 + 0 + 2 + 2 + 2) / 6)  # rows 0 and 2
    assert m["async/partial_rows_frac"] == 0.5  # row 0 spans versions 3 and 4


def test_a_resume_with_a_smaller_bound_drops_the_stale_batches_counts_them_and_samples_anew() -> None:
    engine = Engine()
    work = workload(engine, staleness=2)
    train(work, engine, 10, stop=2)  # versions 0, 1: two batches in flight, started at versions 0 and 1
    state = work.state_dict()
    stricter = workload(engine, staleness=0)
    stricter.load_state_dict(state)
    step3 = stricter.collect(3, 2, 5)  # the oldest stored batch lags 2 > 0: dropped, one sampled now trains
    m = step3.metrics
    assert m["async/stale_dropped_frac"] == 1.0 and m["off_policy_lag"] == 0
    assert step3.rollout is not None and step3.rollout.weight_version == 2
    assert step3.rollout.prompts[0] == PROMPTS[8]  # the next prompts in data order: the dropped ones are gone
    assert m["async/samples_stale_dropped"] == 2 * SAMPLES
    assert m["async/samples_drawn"] == m["async/samples_trained"] + m["async/samples_stale_dropped"]
    assert m["async/samples_submitted"] == m["async/samples_drawn"] + m["async/in_flight_samples"]
    assert m["async/in_flight"] == 1  # the younger stored batch, trained next (lag 2 > 0: dropped too)
    assert stricter.collect(4, 3, 4).metrics["async/stale_dropped_frac"] == 1.0


class HalfOld(Engine):
    """Whole batches whose second prompt's rows were sampled 3 versions before the first's (as rows concatenated
    from generation batches of different ages would be)."""

    def _whole(self, *args: Any) -> Rollout:
        rollout = super()._whole(*args)
        old = torch.arange(len(rollout)) >= len(rollout) // 2
        versions = torch.full(rollout.mask.shape, rollout.weight_version) - 3 * old.unsqueeze(-1)
        rollout.token_versions = versions
        return rollout


def test_only_the_rows_past_the_bound_are_dropped_and_the_rest_train() -> None:
    engine = HalfOld()
    engine.weight_version = 5
    step = workload(engine, staleness=1).collect(6, 5, 3)
    assert step.rollout is not None and step.rollout.prompts == [PROMPTS[0]] * SAMPLES
    assert step.rollout.weight_version == 5
    m = step.metrics
    assert m["async/stale_dropped_frac"] == 0.5 and m["async/staleness_max"] == 3 and m["off_policy_lag"] == 0
    assert m["async/samples_stale_dropped"] == SAMPLES and m["async/samples_trained"] == SAMPLES


MODES = {"whole": {}, "whole_ray": {"ray": True}, "partial": {"chunk": 2}, "partial_ray": {"chunk": 2, "ray": True},
         "long_horizon": {"long_horizon_temperature": 0.5, "long_horizon_candidates": 2}}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_checkpoint_carries_the_batches_in_flight_and_a_resume_trains_every_sample_once(mode: str,
                                                                                        tmp_path: Path) -> None:
    """Uninterrupted vs checkpointed at step 3 (two batches in flight, partial ones mid-generation) and resumed
    in a fresh workload and engine: the same rows, tokens, log-probs and versions at every later step; every
    prompt trained once, in data order; and checkpointing leaves the run it is taken from unchanged."""
    options = dict(MODES[mode])
    ray = options.pop("ray", False)
    chunk = options.pop("chunk", None)

    def new() -> tuple[Engine, PolicyWorkload]:
        engine = Engine(ray=ray)
        return engine, workload(engine, staleness=2, chunk=chunk, **options)

    torch.manual_seed(0)
    engine, work = new()
    reference = train(work, engine, 8)

    torch.manual_seed(0)
    engine, work = new()
    before = train(work, engine, 8, stop=3)
    save_checkpoint(tmp_path, step=3, save_learner=lambda p: p.mkdir(),
                    extra={"workload": work.state_dict(), "version": 3})
    saved = tmp_path / "step-00000003"
    assert len(json.loads((saved / "state.json").read_text())["extra"]["workload"]["in_flight"]) == 2
    assert (saved / "tensors.pt").is_file()
    went_on = train(work, engine, 8, start=3)  # the checkpointed run itself goes on

    torch.manual_seed(1234)  # the checkpoint's RNG state is what counts
    engine, resumed = new()
    state = load_checkpoint(saved, load_learner=lambda p: None)
    resumed.load_state_dict(state.extra["workload"])
    engine.weight_version = int(state.extra["version"])
    after = train(resumed, engine, 8, start=3)

    for run in (went_on, after):
        for a, b in zip(reference[3:], run, strict=True):
            assert a.rollout is not None and b.rollout is not None
            assert a.rollout.prompts == b.rollout.prompts and a.rollout.completions == b.rollout.completions
            assert torch.equal(a.rollout.completion_ids, b.rollout.completion_ids)
            assert torch.equal(a.rollout.logp, b.rollout.logp)
            assert token_versions(a.rollout) == token_versions(b.rollout)
            assert {k: v for k, v in a.metrics.items() if not k.startswith("time/")} == \
                   {k: v for k, v in b.metrics.items() if not k.startswith("time/")}
    assert prompts_trained(before + after) == prompts_trained(reference) == \
        [p for p in PROMPTS[:16] for _ in range(SAMPLES)]
    last = after[-1].metrics
    assert last["async/in_flight"] == 0
    assert last["async/samples_submitted"] == last["async/samples_drawn"] == last["async/samples_trained"] \
        == 16 * SAMPLES


def test_tensors_anywhere_in_the_saved_state_come_back_and_old_checkpoints_still_load(tmp_path: Path) -> None:
    state = {"a": [1, {"t": torch.arange(3)}], "b": torch.ones(2, 2, dtype=torch.float64), "c": None, "d": "x"}
    tensors: dict[str, torch.Tensor] = {}
    plain = split_tensors(state, tensors)
    json.dumps(plain)  # what state.json holds
    back = join_tensors(plain, tensors)
    assert torch.equal(back["a"][1]["t"], torch.arange(3)) and back["b"].dtype == torch.float64
    assert back["c"] is None and back["d"] == "x"
    path = save_checkpoint(tmp_path, step=1, save_learner=lambda p: p.mkdir(), extra={"version": 1})
    assert not (path / "tensors.pt").exists()  # nothing in flight: nothing more than before
    written = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**written, "schema": 2}))  # what the previous version wrote
    assert load_checkpoint(path, load_learner=lambda p: None).extra == {"version": 1}


RECIPE = {"rewards": [{"name": "exact_match"}]}


@pytest.mark.parametrize(("runtime", "rollout", "words"), [
    ({"overlap": True, "max_staleness": 2}, {}, ["'runtime.max_staleness'", "runtime.overlap: true", "shorthand"]),
    ({"overlap": False, "max_staleness": 2}, {}, ["'runtime.max_staleness'", "runtime.overlap: false"]),
    ({"partial_rollouts": True}, {}, ["'runtime.partial_rollouts'", "max_staleness >= 1"]),
    ({"partial_chunk_tokens": 2, "max_staleness": 2}, {}, ["'runtime.partial_chunk_tokens'", "partial_rollouts"]),
    ({"partial_rollouts": True, "max_staleness": 2}, {"long_horizon_temperature": 0.5},
     ["runtime.partial_rollouts", "rollout.long_horizon_temperature"]),
    ({"partial_rollouts": True, "max_staleness": 2}, {"environment": {"name": "calculator"}},
     ["runtime.partial_rollouts", "rollout.environment"]),
    ({"max_staleness": -1}, {}, ["'runtime.max_staleness'", "greater than or equal to 0"]),
])
def test_combinations_that_cannot_run_are_refused_in_one_line(runtime: dict, rollout: dict, words: list[str]) -> None:
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({**RECIPE, "runtime": runtime, "rollout": rollout})
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_the_staleness_keys_default_from_overlap_and_the_token_budget() -> None:
    def runtime(**keys: Any) -> Any:
        return recipe_from_dict({**RECIPE, "runtime": keys, "rollout": {"max_new_tokens": 7}}).runtime

    assert runtime().staleness() == 0 and runtime(overlap=True).staleness() == 1
    assert runtime(overlap=True, max_staleness=1).staleness() == 1
    assert runtime(overlap=False, max_staleness=0).staleness() == 0
    assert runtime(max_staleness=3).staleness() == 3 and runtime(max_staleness=3).chunk_tokens(7) is None
    assert runtime(max_staleness=3, partial_rollouts=True).chunk_tokens(7) == 3  # ceil(7 / 3)
    assert runtime(overlap=True, partial_rollouts=True).chunk_tokens(7) == 7
    assert runtime(max_staleness=2, partial_rollouts=True, partial_chunk_tokens=2).chunk_tokens(7) == 2
