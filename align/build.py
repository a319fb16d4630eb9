"""From a recipe to the things a run is made of: run directories, data, the base model, LoRA, the learner.

Shared by both runtimes: the local runtime calls these in this process, each Ray actor calls the same functions in
its own (so a rank's model, adapter initialisation and optimiser are the local runtime's, by construction).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from align.algorithms import AlgorithmSpec
from align.components import rewards_provider
from align.config import Recipe, RecipeError
from align.data.loading import as_text, load_prompt_dataset
from align.data.tasks import build_task
from align.errors import InputError
from align.models.named import is_named_model, prepare_named_model
from align.trainers.checkpoint import latest_checkpoint
from align.trainers.evaluate import Verifier, greedy_accuracy
from align.trainers.learner import PolicyLearner, PreferenceLearner
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.strategy import Reference, Strategy

CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------------------------
def new_run_dir(recipe: Recipe) -> Path:
    root = Path(recipe.logging.dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{recipe.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{recipe.name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return run_dir


def find_resumable_run(recipe: Recipe, resume: str | Path | bool) -> Path:
    """``resume=True``: the newest run of this recipe's name with a checkpoint; a path: that run directory."""
    if resume is not True:
        assert resume is not False
        run_dir = Path(resume)
        if latest_checkpoint(run_dir / "checkpoints") is None:
            raise RecipeError(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
        return run_dir
    own = re.compile(rf"{re.escape(recipe.name)}-\d{{8}}-\d{{6}}(-\d+)?")  # not runs of "<name>-lora" recipes
    candidates = sorted((p for p in Path(recipe.logging.dir).glob(f"{recipe.name}-*") if own.fullmatch(p.name)),
                        key=lambda p: p.stat().st_mtime)
    for run_dir in reversed(candidates):
        if latest_checkpoint(run_dir / "checkpoints") is not None:
            return run_dir
    raise RecipeError(f"--resume: no run of {recipe.name!r} with a checkpoint under {recipe.logging.dir}/")


# ---------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------
def load_data(recipe: Recipe) -> tuple[Any, Any]:
    """(train, test) datasets with ``prompt`` and ``answer`` columns."""
    d = recipe.data
    if d.task is not None:
        splits = build_task(d.task, train_size=d.train_size, eval_size=d.eval_size, seed=recipe.seed, **d.task_options)
        return splits["train"], splits["test"]
    assert d.path is not None
    train = load_prompt_dataset(d.path, split=d.split, prompt_column=d.prompt_column, answer_column=d.answer_column,
                                subset=d.subset, answer_regex=d.answer_regex)
    test = None
    if d.eval_split is not None:
        try:
            test = load_prompt_dataset(d.path, split=d.eval_split, prompt_column=d.prompt_column,
                                       answer_column=d.answer_column, subset=d.subset, answer_regex=d.answer_regex)
        except Exception:
            test = None
    if test is None:
        split = train.train_test_split(test_size=min(d.eval_size, max(1, len(train) // 10)), seed=recipe.seed)
        train, test = split["train"], split["test"]
    return train.select(range(min(len(train), d.train_size))), test.select(range(min(len(test), d.eval_size)))


def _tiny_cache_key(recipe: Recipe) -> str:
    from align.models.tiny import DEFAULT_ALPHABET

    payload = {"v": CACHE_VERSION, "task": recipe.data.task, "options": recipe.data.task_options,
               "sizes": [recipe.data.train_size, recipe.data.eval_size], "seed": recipe.seed,
               "tiny": recipe.model.tiny.model_dump(), "sft": None if recipe.model.sft_warmup is None
               else recipe.model.sft_warmup.model_dump(), "alphabet": DEFAULT_ALPHABET,
               "max_new_tokens": recipe.rollout.max_new_tokens}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(recipe: Recipe) -> Path:
    """Where built and converted models are cached, outside the clone: ``model.cache_dir``, ``$ALIGN_CACHE`` or
    ``~/.cache/align``."""
    return Path(recipe.model.cache_dir or os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align")


def tiny_cache_dir(recipe: Recipe) -> Path:
    return cache_root(recipe) / "models" / f"tiny-{recipe.data.task}-{_tiny_cache_key(recipe)}"


def prepare_base_model(recipe: Recipe, log: Callable[[str], None] = print) -> Path:
    """The model directory to start from: ``model.path``; a named offline model (``align list``), converted once and
    cached; or a tiny model built offline for the task, warm-started with SFT and cached (the cache key covers every
    setting that shapes it)."""
    if is_named_model(recipe.model.path):
        try:
            return prepare_named_model(recipe.model.path, cache_root(recipe), log)
        except InputError as err:
            raise RecipeError(f"recipe key 'model.path': {err}") from None
    if recipe.model.path != "tiny":
        return Path(recipe.model.path)
    if recipe.data.task is None:
        raise RecipeError("recipe key 'model.path': 'tiny' builds a model for a synthetic task; set data.task or "
                          "point model.path at a model directory")
    target = tiny_cache_dir(recipe)
    if (target / "config.json").is_file():
        log(f"base model: cached tiny model {target}")
        return target
    from align.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
    from align.trainers.sft import sft

    tokenizer = build_char_tokenizer()
    t = recipe.model.tiny
    model = build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=t.hidden_size, num_layers=t.num_layers,
                                                                 num_heads=t.num_heads,
                                                                 intermediate_size=t.intermediate_size,
                                                                 seed=recipe.seed))
    train, _ = load_data(recipe)
    warm = recipe.model.sft_warmup
    info: dict[str, Any] = {"sft": None}
    if warm is not None and warm.steps > 0:
        hold = min(200, len(train) // 5)
        val, fit = train.select(range(hold)), train.select(range(hold, len(train)))
        score = rewards_provider().verifier(recipe)
        evaluate = lambda: greedy_eval(model, tokenizer, val, score, recipe.rollout.max_new_tokens)  # noqa: E731
        log(f"base model: building a tiny model and warm-starting it with SFT (up to {warm.steps} steps)")
        start = time.perf_counter()
        result = sft(model, tokenizer, fit["prompt"], fit["answer"], steps=warm.steps, lr=warm.lr,
                     batch_size=warm.batch_size, seed=recipe.seed, evaluate=evaluate, eval_every=warm.eval_every,
                     target_accuracy=warm.target_accuracy)
        info["sft"] = {"steps": result.steps, "validation_accuracy": result.accuracy,
                       "seconds": round(time.perf_counter() - start, 1)}
        log(f"base model: SFT stopped after {result.steps} steps at {100 * (result.accuracy or 0):.1f}% validation "
            "accuracy")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "align_tiny.json").write_text(json.dumps(info))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.rename(tmp, target)
    return target


def load_tokenizer(path: Path | str, recipe: Recipe) -> Any:
    """``model.tokenizer`` (default: the model's own), left-padded, with a pad token (EOS where it has none)."""
    from transformers import AutoTokenizer

    source = str(recipe.model.tokenizer or path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        key = "model.tokenizer" if recipe.model.tokenizer else "model.path"
        raise RecipeError(f"recipe key {key!r}: cannot load a tokenizer from {source!r}: "
                          f"{' '.join(str(err).split())[:160]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(path: Path | str, recipe: Recipe) -> tuple[Any, Any]:
    """The model in ``model.dtype`` on ``runtime.device``, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, recipe)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[recipe.model.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as err:
        raise RecipeError(f"recipe key 'model.path': cannot load {str(path)!r}: {' '.join(str(err).split())[:160]}") \
            from None
    model.to(torch.device(recipe.runtime.device))  # type: ignore[arg-type]  # transformers types .to oddly
    return model, tokenizer


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


def greedy_eval(model: Any, tokenizer: Any, data: Any, verifier: Verifier, max_new_tokens: int) -> float:
    """Greedy accuracy of ``model`` on a dataset with a ``prompt`` column (and the verifier's columns)."""
    columns = {c: data[c] for c in data.column_names if c != "prompt"}
    return greedy_accuracy(model, tokenizer, data["prompt"], columns, verifier, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------------------------
# LoRA, seeds, threads and the learner
# ---------------------------------------------------------------------------------------------------------------
def apply_lora(model: Any, recipe: Recipe) -> Any:
    if not recipe.lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [m for m in recipe.lora.target_modules if m not in names]
    if missing:
        raise RecipeError(f"recipe key 'lora.target_modules': the model has no module named {missing[0]!r}")
    config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=list(recipe.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def policy_model(base: Path | str, recipe: Recipe) -> tuple[Any, Any]:
    """The base model with the recipe's dtype and device, and its LoRA adapter (initialised from the recipe's seed,
    so every process that builds it starts from the same adapter); and the tokenizer."""
    model, tokenizer = load_model(base, recipe)
    seed_everything(recipe.seed)
    return apply_lora(model, recipe), tokenizer


def make_learner(recipe: Recipe, spec: AlgorithmSpec, model: Any,
                 strategy: Callable[[Any, torch.optim.Optimizer, Any], Strategy]) -> PolicyLearner | PreferenceLearner:
    """The recipe's learner over ``model``: the core's optimiser and schedule, applied by ``strategy(model,
    optimizer, scheduler)`` (plain torch in-process, DeepSpeed on a Ray rank); the reference policy when the
    algorithm reads one."""
    learner = recipe.learner
    reference = Reference(model, lora=recipe.lora.enabled) if spec.has_reference else None
    optimizer = build_optimizer(model, lr=learner.lr, weight_decay=learner.weight_decay, betas=learner.betas)
    scheduler = build_scheduler(optimizer, kind=learner.scheduler, warmup_steps=learner.warmup_steps,
                                total_steps=learner.steps)
    applied = strategy(model, optimizer, scheduler)
    if spec.kind == "preference":
        return PreferenceLearner(spec, applied, reference, micro_batch_size=learner.micro_batch_size,
                                 precision=learner.mixed_precision)
    return PolicyLearner(spec, applied, reference if spec.kl is not None else None,
                         temperature=recipe.rollout.temperature, micro_batch_size=learner.micro_batch_size,
                         updates_per_batch=learner.updates_per_batch, precision=learner.mixed_precision)


def engine_name(recipe: Recipe) -> str:
    """``rollout.engine``, with ``auto`` resolved: vLLM when installed and the device is a GPU, else transformers
    ``generate`` (on a CPU a small model samples faster with it)."""
    from importlib.util import find_spec

    if recipe.rollout.engine != "auto":
        return recipe.rollout.engine
    return "vllm" if find_spec("vllm") is not None and recipe.runtime.device.startswith("cuda") else "hf"


def engine_options(recipe: Recipe) -> dict[str, Any]:
    """``rollout.engine_options`` with what the recipe already says filled in: for vLLM the device, dtype and seed;
    for transformers ``generate`` the learner's mixed precision (sampling under the same autocast as the update,
    so pi_old matches the learner)."""
    options = dict(recipe.rollout.engine_options)
    if engine_name(recipe) == "hf":
        options.setdefault("precision", recipe.learner.mixed_precision)
    if engine_name(recipe) == "vllm":
        options.setdefault("device", "cuda" if recipe.runtime.device.startswith("cuda") else "cpu")
        options.setdefault("dtype", recipe.model.dtype)
        options.setdefault("seed", recipe.seed)
    return options
