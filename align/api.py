"""The Python API: a recipe in, a finished run directory out.

``train`` resolves the recipe, checks it (the reward side, the runtime's refusals) and hands it to the composition
root (:mod:`align.runs`). Nothing here imports ``rewards`` or ``ray_jobs``: both register into the core through
entry points (:mod:`align.components`).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from align.algorithms import AlgorithmSpec
from align.build import (
    cache_root,
    check_base_model,
    check_writable_dir,
    engine_name,
    find_resumable_run,
    load_data,
    load_model,
    load_model_config,
    new_run_dir,
    prepare_base_model,
    render_prompts,
    tiny_cache_dir,
)
from align.components import RewardsProvider, check_runtime, get_runtime, rewards_provider
from align.config import OptionValueError, Recipe, RecipeError, check_option_values, load_recipe, recipe_from_dict
from align.data.loading import load_preference_dataset
from align.data.tasks import TASKS
from align.envs.build import check_environment, observations_for
from align.errors import AlignError
from align.models.named import is_named_model, named_model_dir
from align.runs import TrainResult, run
from align.trainers.engines import ROLLOUT_ENGINES, engine_options
from align.trainers.policy_scorer import POLICY

__all__ = ["TrainResult", "find_resumable_run", "load_data", "load_model", "load_plugins_and_check",
           "new_run_dir", "prepare_base_model", "resolve_recipe", "train"]


def resolve_recipe(recipe: str | Path | Recipe | dict[str, Any], overrides: tuple[str, ...] = ()) -> Recipe:
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        from align.config import apply_overrides

        return recipe_from_dict(apply_overrides(recipe.model_dump(mode="json"), overrides))
    if isinstance(recipe, dict):
        from align.config import apply_overrides

        return recipe_from_dict(apply_overrides(recipe, overrides))
    return load_recipe(recipe, overrides)




def load_plugins_and_check(recipe: Recipe) -> None:
    """Everything ``align validate`` promises, so that a recipe it accepts does not fail for a recipe reason before
    the first step: plugins load; every reward, credit, task and engine name and option exists and binds; the
    algorithm composes with the credit module; the runtime honours every key the recipe sets; the device exists on
    this machine; the run and cache directories are writable; the base model's configuration and tokenizer load and
    the LoRA targets are among its modules; the data loads, renders and has answers a completion can reach. One-line
    :class:`RecipeError` naming the key otherwise. Nothing here loads weights or builds the SFT model."""
    provider = rewards_provider()
    provider.check(recipe)
    check_environment(recipe)  # rollout.environment: its name and options, now that plugins are loaded
    spec = recipe.algorithm_spec()  # credit granularity vs estimator, now that credit modules are registered
    _check_task_options(recipe)
    if spec.kind == "policy":
        _check_engine_options(recipe)
    check_runtime(recipe, get_runtime(recipe.runtime.backend))
    _check_device(recipe)
    _check_directories(recipe)
    _check_logging_backends(recipe)
    _check_parts_bind(recipe, spec, provider)
    tokenizer = check_base_model(recipe)
    if recipe.rollout.environment is not None:  # its observations render with this tokenizer's chat template
        observations_for(recipe, tokenizer)
    _check_data(recipe, spec, tokenizer)


def _check_task_options(recipe: Recipe) -> None:
    if recipe.data.task is None:
        return
    valid = [p for p in inspect.signature(TASKS.get(recipe.data.task)).parameters
             if p not in ("train_size", "eval_size", "seed")]
    unknown = sorted(set(recipe.data.task_options) - set(valid))
    if unknown:
        raise RecipeError(f"recipe key 'data.task_options.{unknown[0]}': task {recipe.data.task!r} has no such "
                          f"option; valid options: {', '.join(valid)}")


def _check_engine_options(recipe: Recipe) -> None:
    name = engine_name(recipe)
    try:
        valid = engine_options(name)
    except AlignError as err:
        raise RecipeError(f"recipe key 'rollout.engine': {err}") from None
    unknown = sorted(set(recipe.rollout.engine_options) - set(valid))
    if unknown:
        raise RecipeError(f"recipe key 'rollout.engine_options.{unknown[0]}': the {name} engine has no such option; "
                          f"valid options: {', '.join(valid)}")
    if "adapter_sync" in recipe.rollout.engine_options and not recipe.lora.enabled:
        raise RecipeError("recipe key 'rollout.engine_options.adapter_sync': applies to a LoRA policy only; set "
                          "lora.enabled: true or remove it")
    sync = recipe.rollout.engine_options.get("adapter_sync", "auto")
    if sync not in ("auto", "native", "merge"):
        raise RecipeError(f"recipe key 'rollout.engine_options.adapter_sync': {sync!r} is not a way to sync an "
                          "adapter; valid: auto (merge on a CPU, native on a GPU), native, merge")
    try:
        check_option_values("rollout.engine_options", ROLLOUT_ENGINES.info(name)["engine"],
                            recipe.rollout.engine_options)
    except OptionValueError as err:
        raise err.recipe_error() from None


def _check_device(recipe: Recipe) -> None:
    """``runtime.device`` exists here (the recipe's syntax is checked with the recipe). On a Ray cluster the
    devices are the workers', not this machine's."""
    device = recipe.runtime.device
    if recipe.runtime.backend == "ray" and (recipe.runtime.address or os.environ.get("RAY_ADDRESS")):
        return
    if device.startswith("cuda"):
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            have = "no CUDA device" if count == 0 else f"{count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            raise RecipeError(f"recipe key 'runtime.device': {device!r} is not on this machine, which has {have}; "
                              "set runtime.device to one it has (cpu always works)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise RecipeError("recipe key 'runtime.device': 'mps' is not available on this machine; set runtime.device: "
                          "cpu (or cuda where there is a GPU)")


def _check_directories(recipe: Recipe) -> None:
    """The run directory can be created, and so can the model cache where a model will be built or converted."""
    check_writable_dir("logging.dir", recipe.logging.dir)
    path = recipe.model.path
    builds = path == "tiny" and recipe.data.task is not None and not (tiny_cache_dir(recipe) / "config.json").is_file()
    converts = is_named_model(path) and not (named_model_dir(path, cache_root(recipe)) / "config.json").is_file()
    if builds or converts:
        check_writable_dir("model.cache_dir" if recipe.model.cache_dir else "model.cache_dir ($ALIGN_CACHE or "
                           "~/.cache/align)", cache_root(recipe))


def _check_logging_backends(recipe: Recipe) -> None:
    for backend in recipe.logging.backends:
        if find_spec(backend) is None:
            raise RecipeError(f"recipe key 'logging.backends': {backend} is not installed; pip install {backend}, or "
                              "remove it (metrics.jsonl and TensorBoard need nothing more)")


def _check_parts_bind(recipe: Recipe, spec: AlgorithmSpec, provider: RewardsProvider) -> None:
    """The reward side builds as the runtime will build it; auxiliary models are checked, not loaded."""

    def check_scorer(path: str) -> None:
        if path not in ("base", POLICY):  # the base model and the learner's own weights exist by construction
            load_model_config(path, key="credit.options")

    try:
        if spec.kind == "preference":
            provider.token_credit(recipe, spec, check_scorer)
        else:
            provider.reward_function(recipe)
            provider.credit_function(recipe, check_scorer)
        provider.verifier(recipe)
    except RecipeError:
        raise
    except AlignError as err:
        raise RecipeError(f"recipe key 'rewards': {err}") from None


def _check_data(recipe: Recipe, spec: AlgorithmSpec, tokenizer: Any) -> None:
    """The data loads as training loads it, its prompts render, and (for a task) a completion can hold an answer."""
    d = recipe.data
    key = "data.path" if d.path is not None else "data.task_options" if d.task_options else "data"
    try:
        if spec.kind == "preference" and d.path is not None:
            load_preference_dataset(d.path, split=d.split)
            return
        train, test = load_data(recipe)
    except RecipeError:
        raise
    except AlignError as err:
        raise RecipeError(f"recipe key {key!r}: {err}") from None
    except Exception as err:  # the datasets library raises its own types for a torn or foreign file
        raise RecipeError(f"recipe key {key!r}: {d.path or d.task!r} cannot be loaded: {_first_line(err)}") from None
    _check_sft_rows(recipe, len(train))
    if tokenizer is None:  # a named model not converted yet: its tokenizer arrives with the conversion
        return
    try:
        render_prompts(list(train["prompt"][:2]), tokenizer, recipe)
    except Exception as err:  # a tokenizer without a chat template, a prompt that is neither text nor messages
        key = "data.chat_template" if d.chat_template else "data.prompt_column"
        raise RecipeError(f"recipe key {key!r}: the prompts cannot be rendered for the model: {_first_line(err)}") \
            from None
    if spec.kind == "policy" and d.task is not None:
        _check_answers_fit(test, tokenizer, recipe)


def _check_sft_rows(recipe: Recipe, rows: int) -> None:
    """The tiny model's SFT warm start validates on a fifth of the training rows: fewer than 5 leave it none."""
    warm = recipe.model.sft_warmup
    builds = recipe.model.path == "tiny" and not (tiny_cache_dir(recipe) / "config.json").is_file()
    if builds and warm is not None and warm.steps > 0 and rows < 5:
        raise RecipeError(f"recipe key 'data.train_size': the tiny model's SFT warm start holds out a fifth of the "
                          f"training rows to validate on and needs at least 5; got {rows}; raise data.train_size or "
                          "set model.sft_warmup: null")


def _check_answers_fit(test: Any, tokenizer: Any, recipe: Recipe) -> None:
    """A task's answers are what its verifier compares completions with: when even the shortest held-out answer is
    longer than a completion may be, no completion is ever right and training does nothing."""
    answers = [str(a) for a in test["answer"][:64]]
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    budget = recipe.rollout.max_new_tokens
    if lengths and min(lengths) > budget:
        raise RecipeError(f"recipe key 'rollout.max_new_tokens': {budget} tokens cannot hold any answer of the task "
                          f"(the held-out answers take {min(lengths)} to {max(lengths)} tokens), so no completion "
                          f"could be right; raise it to at least {max(lengths)} or make the task smaller "
                          "(data.task_options)")


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(recipe: str | Path | Recipe | dict[str, Any], *overrides: str, resume: str | Path | bool = False,
          log: Callable[[str], None] = print, progress: bool | None = None, **keyword_overrides: Any) -> TrainResult:
    """Train from a recipe; returns the run directory and the final metrics.

    ``overrides`` are ``"key.path=value"`` strings; ``keyword_overrides`` use ``__`` for dots
    (``learner__lr=1e-4``). ``resume=True`` continues the newest run of the recipe from its latest checkpoint.
    """
    extra = tuple(f"{k.replace('__', '.')}={json.dumps(v) if not isinstance(v, str) else v}"
                  for k, v in keyword_overrides.items())
    config = resolve_recipe(recipe, tuple(overrides) + extra)
    load_plugins_and_check(config)
    if resume:
        find_resumable_run(config, resume)  # a run to resume exists: found out before the base model is built
    spec = config.algorithm_spec()
    with torch_threads(config.runtime.threads):
        return run(config, spec, resume=resume, log=log,
                   progress=config.logging.progress if progress is None else progress)
