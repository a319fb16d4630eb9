"""Held-out evaluation of a finished run or any model directory (``align eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.api import load_plugins_and_check
from align.build import greedy_eval, load_data, load_model
from align.components import rewards_provider
from align.config import Recipe, RecipeError, recipe_from_dict
from align.data.loading import is_file_source, load_prompt_dataset
from align.data.tasks import TASKS


def evaluate(target: str | Path, *, data: str, reward: str = "exact_match", size: int = 500,
             max_new_tokens: int = 8, seed: int = 0) -> float:
    """Greedy accuracy of a run (its ``final`` model) or a model directory on a task's held-out split or a
    dataset with ``prompt`` and ``answer`` columns."""
    path = Path(target)
    if (path / "final").is_dir():
        path = path / "final"
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise RecipeError(f"{target}: neither a run directory with final/ nor a model directory")
    task = data if data in TASKS else None
    recipe_data = {"name": "eval", "seed": seed, "model": {"path": str(path)},
                   "data": {"task": task, "path": None if task else data, "eval_size": size,
                            "train_size": max(size * 4, 1000)},
                   "rewards": [{"name": reward}], "rollout": {"max_new_tokens": max_new_tokens}}
    config = recipe_from_dict(recipe_data)
    load_plugins_and_check(config)
    model, tokenizer = _load_for_eval(path, config)
    test = _whole_file(data, size) if task is None and is_file_source(data) else load_data(config)[1]
    return greedy_eval(model, tokenizer, test, rewards_provider().verifier(config), max_new_tokens)


def _whole_file(path: str, size: int) -> Any:
    """A file given to ``align eval`` is held-out data, all of it (a training run splits its file instead)."""
    rows = load_prompt_dataset(path, split="train", prompt_column="prompt", answer_column="answer")
    return rows.select(range(min(len(rows), size)))


def _load_for_eval(path: Path, recipe: Recipe) -> tuple[Any, Any]:
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer.padding_side = "left"
        return model.eval(), tokenizer
    model, tokenizer = load_model(path, recipe)
    return model.eval(), tokenizer
