"""Running a recipe end to end on the local runtime: build everything, train, evaluate, checkpoint, log.

Part of the composition root with :mod:`align.api` (allowed to import ``rewards``).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.api import (
    TrainResult,
    _accuracy_entry,
    _composer,
    _greedy,
    _task_verifier,
    apply_lora,
    find_resumable_run,
    load_data,
    load_model,
    new_run_dir,
    prepare_base_model,
    reference_fn,
)
from align.config import Recipe, RecipeError
from align.data.loading import as_text, load_preference_dataset
from align.trainers.checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from align.trainers.engines import get_engine_factory, vllm_installed
from align.trainers.metrics import MetricsLogger
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.policy import PolicyLoopConfig, PolicyTrainer
from align.trainers.preference import PairBatch, PreferenceStep, task_pairs
from align.trainers.progress import Progress
from align.trainers.protocols import SamplingParams
from align.trainers.sampler import PromptSampler
from align.trainers.samples import SampleRecorder


def render_prompts(prompts: list[Any], tokenizer: Any, recipe: Recipe) -> list[str]:
    """Prompts as the model sees them: as given, or as a user turn in the chat template."""
    if not recipe.data.chat_template:
        return [p if isinstance(p, str) else as_text(p, tokenizer, add_generation_prompt=True) for p in prompts]
    system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
    return [as_text([*system, {"role": "user", "content": p}] if isinstance(p, str) else p, tokenizer,
                    add_generation_prompt=True) for p in prompts]


def with_rendered_prompts(dataset: Any, tokenizer: Any, recipe: Recipe) -> Any:
    rendered = render_prompts(dataset["prompt"], tokenizer, recipe)
    return dataset.remove_columns("prompt").add_column("prompt", rendered)


def open_run(recipe: Recipe, resume: str | Path | bool, model: Any, optimizer: Any, scheduler: Any,
             log: Callable[[str], None]) -> tuple[Path, TrainingState | None, MetricsLogger]:
    """A new run directory, or the resumed run with its latest checkpoint loaded; and its metrics logger, with any
    lines logged after that checkpoint dropped (the resumed run logs them again)."""
    state = None
    if resume:
        run_dir = find_resumable_run(recipe, resume)
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        assert checkpoint is not None
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        log(f"resuming {run_dir} from step {state.step}")
    else:
        run_dir = new_run_dir(recipe)
    logger = MetricsLogger(run_dir, tensorboard=recipe.logging.tensorboard, backends=recipe.logging.backends,
                           project=recipe.logging.project, config=recipe.model_dump(mode="json"))
    logger.truncate_after(0 if state is None else state.step)
    return run_dir, state, logger


def build_engine(model: Any, tokenizer: Any, base: Path, recipe: Recipe) -> Any:
    name = recipe.rollout.engine
    if name == "auto":
        name = "vllm" if vllm_installed() and recipe.runtime.device.startswith("cuda") else "hf"
    options = dict(recipe.rollout.engine_options)
    if name == "vllm":
        options.setdefault("device", "cuda" if recipe.runtime.device.startswith("cuda") else "cpu")
        options.setdefault("dtype", recipe.model.dtype)
        options.setdefault("seed", recipe.seed)
    try:
        return get_engine_factory(name)(model, tokenizer, base, options)
    except TypeError as err:
        raise RecipeError(f"recipe key 'rollout.engine_options': {err}") from None


def credit_diagnostics(names: list[str]) -> Any:
    """Per-token credit of the named modules on recorded samples (modules that need inputs the rollout lacks, such
    as auxiliary models or entropy, are skipped)."""
    if not names:
        return None
    from align.errors import InputError
    from rewards.credit import CREDIT, CreditInputs

    def diagnose(rollout: Any, rewards: Tensor) -> dict[str, Tensor]:
        x = CreditInputs(rewards=rewards.to(torch.float32), mask=rollout.mask, token_ids=rollout.completion_ids,
                         group_ids=rollout.group_ids, prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                         logp=rollout.logp)
        out = {}
        for name in names:
            try:
                out[name] = CREDIT.get(name)(x)
            except (InputError, TypeError):
                continue
        return out

    return diagnose


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def run_policy(recipe: Recipe, spec: AlgorithmSpec, *, resume: str | Path | bool, log: Callable[[str], None],
               progress: bool) -> TrainResult:
    base = prepare_base_model(recipe, log)
    model, tokenizer = load_model(base, recipe)
    seed_everything(recipe.seed)  # after the (maybe cached) base model: building it consumes random numbers
    model = apply_lora(model, recipe)
    reference = reference_fn(model, recipe, spec)
    train, test = (with_rendered_prompts(d, tokenizer, recipe) for d in load_data(recipe))
    from rewards.adapters import ComposerRewardFunction, CreditModuleFunction

    reward_fn = ComposerRewardFunction(_composer(recipe))
    credit_fn = None if recipe.credit is None else CreditModuleFunction(recipe.credit.name, recipe.credit.options,
                                                                        base_dir=base)
    optimizer = build_optimizer(model, lr=recipe.learner.lr, weight_decay=recipe.learner.weight_decay,
                                betas=recipe.learner.betas)
    scheduler = build_scheduler(optimizer, kind=recipe.learner.scheduler, warmup_steps=recipe.learner.warmup_steps,
                                total_steps=recipe.learner.steps)
    engine = build_engine(model, tokenizer, base, recipe)
    accuracy_entry = _accuracy_entry(recipe)
    config = PolicyLoopConfig(
        steps=recipe.learner.steps, prompts_per_step=recipe.rollout.prompts_per_step,
        samples_per_prompt=recipe.rollout.samples_per_prompt,
        sampling=SamplingParams(max_new_tokens=recipe.rollout.max_new_tokens, temperature=recipe.rollout.temperature,
                                top_p=recipe.rollout.top_p),
        micro_batch_size=recipe.learner.micro_batch_size, updates_per_batch=recipe.learner.updates_per_batch,
        max_grad_norm=recipe.learner.max_grad_norm, accuracy_reward=None if accuracy_entry is None
        else accuracy_entry.name, precision=recipe.learner.mixed_precision,
    )
    columns = {c: train[c] for c in train.column_names if c != "prompt"}
    trainer = PolicyTrainer(spec=spec, model=model, engine=engine, reward_fn=reward_fn, optimizer=optimizer,
                            scheduler=scheduler, config=config, prompts=train["prompt"], columns=columns,
                            sampler=PromptSampler(len(train), recipe.seed), reference=reference,
                            credit_fn=credit_fn, credit_needs_entropy=bool(getattr(credit_fn, "needs_entropy", 0)))
    score = _task_verifier(recipe)

    def evaluate() -> float:
        return _greedy(model, tokenizer, test, score, recipe.rollout.max_new_tokens)

    seed_everything(recipe.seed + 1)  # the training stream starts from a known state (a resume restores its own)
    run_dir, state, logger = open_run(recipe, resume, model, optimizer, scheduler, log)
    start_step, before = (0, None) if state is None else (state.step, state.extra.get("accuracy_before"))
    if state is not None:
        trainer.sampler.load_state_dict(state.extra["sampler"])
        trainer.version = int(state.extra["version"])
        engine.sync_weights(model, trainer.version)
    samples = SampleRecorder(run_dir, tokenizer, per_step=recipe.logging.samples_per_step,
                             max_bytes=int(recipe.logging.samples_max_mb * 2**20),
                             diagnostics=credit_diagnostics(recipe.logging.credit_diagnostics))
    samples.truncate_after(start_step)
    sample_every = recipe.logging.sample_every or recipe.logging.eval_every
    if before is None:
        before = evaluate()
        logger.log(0, {"eval/accuracy": before})
        log(f"run directory: {run_dir}")
        log(f"held-out accuracy before training: {_pct(before)}")
    bar = Progress(recipe.learner.steps, start_step, progress, log)
    last: dict[str, float] = {}
    try:
        for step in range(start_step + 1, recipe.learner.steps + 1):
            output = trainer.step(step)
            last = output.metrics
            if (step == 1 or step % sample_every == 0) and output.rollout is not None:
                assert output.rewards is not None and output.advantages is not None
                samples.record(step, output.rollout, output.rewards, output.advantages, output.credit)
            if step % recipe.logging.eval_every == 0 or step == recipe.learner.steps:
                last["eval/accuracy"] = evaluate()
            logger.log(step, last)
            bar.update(step, last)
            if step % recipe.checkpoint.every == 0 or step == recipe.learner.steps:
                save_checkpoint(run_dir / "checkpoints", step=step, model=model, optimizer=optimizer,
                                scheduler=scheduler, keep=recipe.checkpoint.keep,
                                extra={"sampler": trainer.sampler.state_dict(), "version": trainer.version,
                                       "accuracy_before": before})
    finally:
        bar.close()
        logger.close()
    after = last.get("eval/accuracy", before)
    save_final(model, tokenizer, run_dir, recipe)
    summary = {**last, "eval/accuracy_before": before, "eval/accuracy_after": after}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    log(f"held-out accuracy: {_pct(before)} -> {_pct(after)}")
    return TrainResult(run_dir=run_dir, metrics=summary)


def save_final(model: Any, tokenizer: Any, run_dir: Path, recipe: Recipe) -> Path:
    """The trained model in Hugging Face format (a PEFT adapter under LoRA, merged too if asked)."""
    final = run_dir / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    if recipe.lora.enabled and recipe.lora.merge_on_save:
        merged = model.merge_and_unload()
        merged.save_pretrained(run_dir / "final_merged")
        tokenizer.save_pretrained(run_dir / "final_merged")
    return final


def run_preference(recipe: Recipe, spec: AlgorithmSpec, *, resume: str | Path | bool, log: Callable[[str], None],
                   progress: bool) -> TrainResult:
    base = prepare_base_model(recipe, log)
    model, tokenizer = load_model(base, recipe)
    seed_everything(recipe.seed)
    model = apply_lora(model, recipe)
    train_pairs, test_pairs, test_prompts = _pairs(recipe)
    reference = _reference(model, recipe, spec)
    extras = _token_extras(recipe, spec, model, tokenizer, base)
    step_fn = PreferenceStep(spec, model, reference, extras, recipe.learner.micro_batch_size,
                             precision=recipe.learner.mixed_precision)
    optimizer = build_optimizer(model, lr=recipe.learner.lr, weight_decay=recipe.learner.weight_decay,
                                betas=recipe.learner.betas)
    scheduler = build_scheduler(optimizer, kind=recipe.learner.scheduler, warmup_steps=recipe.learner.warmup_steps,
                                total_steps=recipe.learner.steps)
    sampler = PromptSampler(len(train_pairs), recipe.seed)
    held_out = PairBatch(tokenizer, test_pairs["prompt"], test_pairs["chosen"], test_pairs["rejected"])
    score = _task_verifier(recipe) if recipe.data.task is not None else None

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            stats = step_fn(held_out, backward=False)
        out = {"eval/preference_accuracy": stats["rewards/accuracy"], "eval/loss": stats["loss"]}
        if score is not None and test_prompts is not None:
            out["eval/accuracy"] = _greedy(model, tokenizer, test_prompts, score, recipe.rollout.max_new_tokens)
        model.train()
        return out

    seed_everything(recipe.seed + 1)
    run_dir, state, logger = open_run(recipe, resume, model, optimizer, scheduler, log)
    start_step, before = (0, None) if state is None else (state.step, state.extra.get("before"))
    if state is not None:
        sampler.load_state_dict(state.extra["sampler"])
    if before is None:
        before = evaluate()
        logger.log(0, before)
        log(f"run directory: {run_dir}")
    bar = Progress(recipe.learner.steps, start_step, progress, log)
    last: dict[str, float] = {}
    model.train()
    try:
        for step in range(start_step + 1, recipe.learner.steps + 1):
            index = sampler.next(recipe.rollout.prompts_per_step)
            rows = train_pairs.select(index)
            batch = PairBatch(tokenizer, rows["prompt"], rows["chosen"], rows["rejected"])
            optimizer.zero_grad(set_to_none=True)
            last = step_fn(batch, backward=True)
            params = [p for p in model.parameters() if p.requires_grad]
            if recipe.learner.max_grad_norm is not None:
                last["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, recipe.learner.max_grad_norm))
            optimizer.step()
            scheduler.step()
            last["lr"] = float(optimizer.param_groups[0]["lr"])
            if step % recipe.logging.eval_every == 0 or step == recipe.learner.steps:
                last.update(evaluate())
            logger.log(step, last)
            bar.update(step, last)
            if step % recipe.checkpoint.every == 0 or step == recipe.learner.steps:
                save_checkpoint(run_dir / "checkpoints", step=step, model=model, optimizer=optimizer,
                                scheduler=scheduler, keep=recipe.checkpoint.keep,
                                extra={"sampler": sampler.state_dict(), "before": before})
    finally:
        bar.close()
        logger.close()
    save_final(model, tokenizer, run_dir, recipe)
    summary = {**last, **{f"{k}_before": v for k, v in before.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    b, a = before["eval/preference_accuracy"], last.get("eval/preference_accuracy", float("nan"))
    log(f"held-out preference accuracy: {100 * b:.1f}% -> {100 * a:.1f}%")
    if "eval/accuracy" in before:
        log(f"held-out accuracy: {100 * before['eval/accuracy']:.1f}% -> {100 * last.get('eval/accuracy', 0):.1f}%")
    return TrainResult(run_dir=run_dir, metrics=summary)


def _pairs(recipe: Recipe) -> tuple[Any, Any, Any]:
    """(train pairs, held-out pairs, held-out prompts with answers for greedy accuracy, or None)."""
    if recipe.data.task is not None:
        train, test = load_data(recipe)
        return task_pairs(train, recipe.seed), task_pairs(test, recipe.seed + 1), test
    assert recipe.data.path is not None
    data = load_preference_dataset(recipe.data.path, split=recipe.data.split)
    split = data.train_test_split(test_size=min(recipe.data.eval_size, max(1, len(data) // 10)), seed=recipe.seed)
    return split["train"], split["test"], None


class _Frozen:
    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> Any:
        return self.model

    def __exit__(self, *exc: object) -> None:
        return None


def _reference(model: Any, recipe: Recipe, spec: AlgorithmSpec) -> Callable[[], Any] | None:
    """A context manager factory yielding the reference model (LoRA: adapters disabled; else a frozen copy)."""
    if not spec.has_reference:
        return None
    if recipe.lora.enabled:
        @contextmanager
        def disabled() -> Iterator[Any]:
            with model.disable_adapter():
                yield model

        return disabled
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lambda: _Frozen(frozen)


def _token_extras(recipe: Recipe, spec: AlgorithmSpec, model: Any, tokenizer: Any,
                  base: Path) -> Callable[[PairBatch, Tensor], dict[str, Tensor]] | None:
    """cdpo token weights / tgdpo token rewards from the recipe's credit module, on chosen and rejected."""
    if spec.preference_loss not in ("cdpo", "tgdpo"):
        return None
    wanted = {"cdpo": "contrastive_critical", "tgdpo": "implicit_dpo"}[spec.preference_loss]
    if recipe.credit is None or recipe.credit.name != wanted:
        raise RecipeError(f"recipe key 'credit': {spec.preference_loss} takes its token "
                          f"{'weights' if wanted == 'contrastive_critical' else 'rewards'} from credit module "
                          f"{wanted!r}; add credit: {{name: {wanted}, options: {{...}}}}")
    from rewards.adapters import resolve_models
    from rewards.credit import CREDIT, CreditInputs

    needed = ("dpo_model", "ref_model") if wanted == "implicit_dpo" else ("positive_model", "negative_model")
    options = resolve_models({**{k: "base" for k in needed}, **recipe.credit.options}, base)
    if wanted == "implicit_dpo":
        options["outcome_weight"] = 0.0
    module = CREDIT.get(wanted)

    def credit(ids: Tensor, mask: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, reward: float) -> Tensor:
        n = ids.shape[0]
        x = CreditInputs(rewards=torch.full((n,), reward), mask=mask, token_ids=ids,
                         group_ids=torch.arange(n), prompt_ids=prompt_ids, prompt_mask=prompt_mask)
        return module(x, **options)

    def extras(batch: PairBatch, rows: Tensor) -> dict[str, Tensor]:
        p, pm = batch.prompt_ids[rows], batch.prompt_mask[rows]
        chosen = credit(batch.chosen_ids[rows], batch.chosen_mask[rows], p, pm, 1.0)
        if wanted == "contrastive_critical":  # the rejected side is the "negative" completion: weights 1 - s_t
            ids, mask = batch.rejected_ids[rows], batch.rejected_mask[rows]
            n = ids.shape[0]
            x = CreditInputs(rewards=torch.cat([torch.ones(n), torch.zeros(n)]),
                             mask=torch.cat([mask, mask]), token_ids=torch.cat([ids, ids]),
                             group_ids=torch.arange(n).repeat(2), prompt_ids=torch.cat([p, p]),
                             prompt_mask=torch.cat([pm, pm]))
            rejected = module(x, **options)[n:]
            return {"rejected_weights": rejected}
        rejected = credit(batch.rejected_ids[rows], batch.rejected_mask[rows], p, pm, 0.0)
        return {"chosen_token_rewards": chosen, "rejected_token_rewards": rejected}

    return extras
