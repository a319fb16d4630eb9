"""The composition root: recipe -> parts -> the controller loop -> a finished run directory.

One path for every runtime and workload: the runtime (``runtime.backend``, found through entry points) places the
parts, the workload (policy or preference) turns data into the learner's batches, and
:class:`~align.trainers.controller.Controller` runs the loop. Nothing here knows whether a part is in this process
or behind a Ray actor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.algorithms import AlgorithmSpec
from align.build import (
    engine_context,
    find_resumable_run,
    greedy_eval,
    load_data,
    load_tokenizer,
    new_run_dir,
    prepare_base_model,
    seed_everything,
    train_and_held_out,
    with_rendered_prompts,
)
from align.components import Parts, RunPlan, check_runtime, get_runtime, rewards_provider
from align.config import Recipe
from align.data.loading import load_preference_dataset
from align.envs.build import with_environment
from align.losses import RolloutCorrection
from align.trainers.checkpoint import latest_checkpoint
from align.trainers.controller import Controller, Schedule
from align.trainers.metrics import MetricsLogger, read_metrics
from align.trainers.preference import task_pairs, tokenize_pairs
from align.trainers.probe import ProbeCheck
from align.trainers.protocols import ANSWER_IDS, SamplingParams, Workload
from align.trainers.sampler import PromptSampler
from align.trainers.samples import SampleRecorder
from align.trainers.sequences import encode
from align.trainers.workload import PolicyWorkload, PreferenceWorkload


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]  # the last logged step, plus <metric>_before and <metric>_after of each evaluation


def run(recipe: Recipe, spec: AlgorithmSpec, *, resume: str | Path | bool, log: Callable[[str], None],
        progress: bool) -> TrainResult:
    runtime = get_runtime(recipe.runtime.backend)
    check_runtime(recipe, runtime)
    provider = rewards_provider()

    def warn(message: str) -> None:
        log(f"warning: {message}")

    run_dir = find_resumable_run(recipe, resume) if resume else None
    finished = None if run_dir is None else _finished(run_dir, recipe, log)
    if finished is not None:
        return finished
    base = prepare_base_model(recipe, log)
    tokenizer = load_tokenizer(base, recipe)
    parts = runtime.place(RunPlan(recipe, spec, base, tokenizer, provider, log))
    try:
        seed_everything(recipe.seed + 1)  # the training stream starts from a known state (a resume restores its own)
        workload: Workload
        if spec.kind == "preference":
            workload, evaluate, probe_prompts = _preference(recipe, parts, tokenizer)
        else:
            workload, evaluate, probe_prompts = _policy(recipe, spec, parts, tokenizer, warn)
        run_dir = run_dir or new_run_dir(recipe)
        logger = MetricsLogger(run_dir, tensorboard=recipe.logging.tensorboard, backends=recipe.logging.backends,
                               project=recipe.logging.project, config=recipe.model_dump(mode="json"), warn=warn)
        samples = None if spec.kind == "preference" else SampleRecorder(
            run_dir, tokenizer, per_step=recipe.logging.samples_per_step,
            max_bytes=int(recipe.logging.samples_max_mb * 2**20),
            diagnostics=provider.diagnostics(recipe.logging.credit_diagnostics), warn=warn)
        probe = None if probe_prompts is None else ProbeCheck(
            probe_prompts, tolerance=probe_tolerance(recipe), max_new_tokens=recipe.rollout.max_new_tokens,
            temperature=recipe.rollout.temperature)
        controller = Controller(
            workload=workload, learner=parts.learner, evaluate=evaluate, logger=logger, sync=parts.sync,
            engine=parts.engine, probe=probe, samples=samples, log=log, progress=progress,
            schedule=Schedule(steps=recipe.learner.steps, eval_every=recipe.logging.eval_every,
                              sample_every=recipe.logging.sample_every or recipe.logging.eval_every,
                              checkpoint_every=recipe.checkpoint.every, keep=recipe.checkpoint.keep,
                              probe_every=recipe.runtime.probe_every))
        before, last = controller.run(run_dir, latest_checkpoint(run_dir / "checkpoints") if resume else None)
        save_final(parts.policy(), tokenizer, run_dir, recipe)
    finally:
        parts.close()
    if not last:  # no step left to run (killed after its last checkpoint, before its summary): as it was logged
        last = _logged_metrics(run_dir, _trained_steps(run_dir), warn)
    summary = {**last, **{f"{k}_before": v for k, v in before.items()},
               **{f"{k}_after": last.get(k, v) for k, v in before.items()}}
    _write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    for key, label in (("eval/preference_accuracy", "held-out preference accuracy"),
                       ("eval/accuracy", "held-out accuracy")):
        if key in before:
            log(f"{label}: {100 * before[key]:.1f}% -> {100 * summary[key + '_after']:.1f}%")
    return TrainResult(run_dir=run_dir, metrics=summary)


def probe_tolerance(recipe: Recipe) -> float:
    """``runtime.probe_tolerance``, or the default for the precision: bf16 rounds log-probs to about 1e-2 (vLLM
    measured 8e-3 against transformers here), fp32 agrees to about 1e-6."""
    if recipe.runtime.probe_tolerance is not None:
        return recipe.runtime.probe_tolerance
    bf16 = recipe.learner.mixed_precision == "bf16" or recipe.model.dtype != "float32"
    return 5e-2 if bf16 else 1e-3


def _finished(run_dir: Path, recipe: Recipe, log: Callable[[str], None]) -> TrainResult | None:
    """The run as it is when it already trained ``learner.steps`` steps (or more) and wrote its summary: resuming
    it leaves ``summary.json`` and ``final/`` untouched. None where steps are left, or the summary is missing."""
    trained = _trained_steps(run_dir)
    summary = _read_summary(run_dir / "summary.json")
    if trained < recipe.learner.steps or summary is None:
        return None
    log(f"{run_dir} already trained {trained} steps (learner.steps={recipe.learner.steps}): nothing to resume; "
        "summary.json and final/ are left as they are")
    return TrainResult(run_dir, summary)


def _trained_steps(run_dir: Path) -> int:
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    return 0 if checkpoint is None else int(checkpoint.name.removeprefix("step-"))


def _read_summary(path: Path) -> dict[str, float] | None:
    """``summary.json``, or None where it is missing or was cut short (then the resumed run writes it again)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _logged_metrics(run_dir: Path, step: int, warn: Callable[[str], None]) -> dict[str, float]:
    """What ``metrics.jsonl`` logged at ``step`` (the summary's last-step metrics), without the step itself."""
    rows = [row for row in read_metrics(run_dir, warn) if row["step"] == step]
    return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


def _write_atomically(path: Path, text: str) -> None:
    """Whole or not at all: a kill while writing leaves no half a summary."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _policy(recipe: Recipe, spec: AlgorithmSpec, parts: Parts, tokenizer: Any,
            log: Callable[[str], None]) -> tuple[PolicyWorkload, Callable[[], dict[str, float]], list[str] | None]:
    train, test = (with_rendered_prompts(d, tokenizer, recipe) for d in load_data(recipe))
    provider = rewards_provider()
    verifier = provider.verifier(recipe)
    assert parts.engine is not None and parts.rewards is not None
    columns = {c: train[c] for c in train.column_names if c != "prompt"}
    if recipe.credit is not None:  # credit modules may score the reference answer's tokens (rlp_information_gain)
        columns[ANSWER_IDS] = encode(tokenizer, [str(a) for a in train["answer"]])
    correction = recipe.algorithm.rollout_correction  # on every step when named (else overlap's is_level / is_cap)
    # rollout.environment: multi-turn episodes over the placed engine's generate_tokens, run here on either runtime
    engine, rewards = with_environment(recipe, parts.engine, parts.rewards, tokenizer,
                                       max_context=engine_context(recipe))
    workload = PolicyWorkload(
        spec=spec, engine=engine, rewards=rewards, learner=parts.learner, prompts=train["prompt"],
        columns=columns,
        sampler=PromptSampler(len(train), recipe.seed), prompts_per_step=recipe.rollout.prompts_per_step,
        samples_per_prompt=recipe.rollout.samples_per_prompt,
        sampling=SamplingParams(max_new_tokens=recipe.rollout.max_new_tokens, temperature=recipe.rollout.temperature,
                                top_p=recipe.rollout.top_p),
        credit=parts.credit, accuracy_reward=provider.accuracy_reward(recipe),
        max_staleness=recipe.runtime.staleness(),
        partial_chunk_tokens=recipe.runtime.chunk_tokens(recipe.rollout.max_new_tokens), tokenizer=tokenizer,
        is_level=recipe.runtime.is_level, is_cap=recipe.runtime.is_cap,
        rollout_correction=None if correction is None else RolloutCorrection(correction.name,
                                                                              dict(correction.options)),
        max_reward_failure_share=recipe.guards.max_reward_failure_share, max_empty_steps=recipe.guards.max_empty_steps,
        long_horizon_temperature=recipe.rollout.long_horizon_temperature,
        long_horizon_candidates=recipe.rollout.candidates(),
        max_generation_batches=recipe.algorithm.generation_batches(), log=log)

    def evaluate() -> dict[str, float]:
        return {"eval/accuracy": greedy_eval(parts.policy(), tokenizer, test, verifier,
                                             recipe.rollout.max_new_tokens)}

    return workload, evaluate, list(test["prompt"][:4])


def _preference(recipe: Recipe, parts: Parts,
                tokenizer: Any) -> tuple[PreferenceWorkload, Callable[[], dict[str, float]], None]:
    """Pairs from ``data.path`` (TRL format), or built from a synthetic task (chosen = the answer, rejected = a near
    miss; then greedy accuracy on the task's held-out prompts is reported too)."""
    test_prompts = None
    if recipe.data.task is not None:
        train, test_prompts = load_data(recipe)
        train_pairs, test_pairs = task_pairs(train, recipe.seed), task_pairs(test_prompts, recipe.seed + 1)
    else:
        train_pairs, test_pairs = train_and_held_out(recipe, lambda path, split: load_preference_dataset(
            path, split=split))
        test_pairs = test_pairs.select(range(min(len(test_pairs), recipe.data.eval_size)))
    workload = PreferenceWorkload(
        pairs=train_pairs, tokenize=lambda p, c, r: tokenize_pairs(tokenizer, p, c, r),
        sampler=PromptSampler(len(train_pairs), recipe.seed), pairs_per_step=recipe.rollout.prompts_per_step,
        token_credit=parts.token_credit)
    held_out = workload.batch(test_pairs)
    verifier = rewards_provider().verifier(recipe) if test_prompts is not None else None

    def evaluate() -> dict[str, float]:
        stats = parts.learner.evaluate(held_out)
        out = {"eval/preference_accuracy": stats["rewards/accuracy"], "eval/loss": stats["loss"]}
        if verifier is not None:
            out["eval/accuracy"] = greedy_eval(parts.policy(), tokenizer, test_prompts, verifier,
                                               recipe.rollout.max_new_tokens)
        return out

    return workload, evaluate, None


def save_final(model: Any, tokenizer: Any, run_dir: Path, recipe: Recipe) -> Path:
    """The trained model in Hugging Face format (a PEFT adapter under LoRA, merged too if asked)."""
    final = run_dir / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    if recipe.lora.enabled and recipe.lora.merge_on_save:  # the model's last use: merged in place, no copy
        merged = model.merge_and_unload()
        merged.save_pretrained(run_dir / "final_merged")
        tokenizer.save_pretrained(run_dir / "final_merged")
    return final
