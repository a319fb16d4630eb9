"""The Python API: a recipe in, a finished run directory out.

``train`` resolves the recipe, checks it (the reward side, the runtime's refusals) and hands it to the composition
root (:mod:`align.runs`). Nothing here imports ``rewards`` or ``ray_jobs``: both register into the core through
entry points (:mod:`align.components`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from align.build import (
    cache_root,
    engine_name,
    find_resumable_run,
    load_data,
    load_model,
    new_run_dir,
    prepare_base_model,
)
from align.components import check_runtime, get_runtime, rewards_provider
from align.config import Recipe, RecipeError, load_recipe, recipe_from_dict
from align.data.tasks import TASKS
from align.errors import AlignError
from align.models.named import check_named_model, is_named_model, named_model_dir
from align.runs import TrainResult, run
from align.trainers.engines import engine_options

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
    """Everything ``align validate`` promises: plugins load, a named model is converted or its package installed,
    every reward and credit name and option exists, the algorithm composes with the credit module, the task takes
    the options given, and the runtime honours every key the recipe sets (or it is refused here, in one line naming
    the key)."""
    rewards_provider().check(recipe)
    path = recipe.model.path
    if is_named_model(path) and not (named_model_dir(path, cache_root(recipe)) / "config.json").is_file():
        try:
            check_named_model(path)
        except AlignError as err:
            raise RecipeError(f"recipe key 'model.path': {err}") from None
    recipe.algorithm_spec()  # credit granularity vs estimator, now that credit modules are registered
    if recipe.data.task is not None:
        valid = [p for p in inspect.signature(TASKS.get(recipe.data.task)).parameters
                 if p not in ("train_size", "eval_size", "seed")]
        unknown = sorted(set(recipe.data.task_options) - set(valid))
        if unknown:
            raise RecipeError(f"recipe key 'data.task_options.{unknown[0]}': task {recipe.data.task!r} has no such "
                              f"option; valid options: {', '.join(valid)}")
    if recipe.algorithm_spec().kind == "policy":
        _check_engine_options(recipe)
    check_runtime(recipe, get_runtime(recipe.runtime.backend))


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
    spec = config.algorithm_spec()
    with torch_threads(config.runtime.threads):
        return run(config, spec, resume=resume, log=log,
                   progress=config.logging.progress if progress is None else progress)
