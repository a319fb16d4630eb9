"""The Python API and composition root: a recipe in, a finished run directory out.

``align.api`` wires the core to the reward registry (``rewards``), so it is the one module of ``align`` allowed to
import ``rewards`` (declared in the import-linter contract); it does so inside functions, keeping ``import align``
light.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from align.algorithms import AlgorithmSpec
from align.config import Recipe, RecipeError, load_recipe, recipe_from_dict
from align.data.loading import load_prompt_dataset
from align.data.tasks import TASKS, build_task

CACHE_VERSION = 1


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]  # the last logged step, plus eval/accuracy_before and eval/accuracy_after


# ---------------------------------------------------------------------------------------------------------------
# Recipes and run directories
# ---------------------------------------------------------------------------------------------------------------
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
    """Import the recipe's plugins, then check every reward and credit name against the registries."""
    import rewards
    from rewards.credit import CREDIT

    try:
        rewards.load_plugins(recipe.plugins)
        rewards.load_entry_points()
    except Exception as err:
        raise RecipeError(f"recipe key 'plugins': {err}") from None
    for i, entry in enumerate(recipe.rewards):
        if entry.name not in rewards.REWARDS:
            from align.config import _choices

            raise RecipeError(f"recipe key 'rewards.{i}.name': " + _choices("unknown reward", entry.name,
                                                                            rewards.REWARDS.names()))
        try:
            rewards.REWARDS.get(entry.name).check_options(entry.options)
        except Exception as err:
            raise RecipeError(f"recipe key 'rewards.{i}.options': {err}") from None
    for i, name in enumerate(recipe.logging.credit_diagnostics):
        if name not in CREDIT:
            from align.config import _choices

            raise RecipeError(f"recipe key 'logging.credit_diagnostics.{i}': " + _choices("unknown credit module",
                                                                                         name, CREDIT.names()))
    if recipe.credit is not None and recipe.credit.name in ("prm_steps", "thr") and \
            recipe.algorithm.spec().kind == "policy":
        needs = ("step scores from a process reward model" if recipe.credit.name == "prm_steps"
                 else "the policy's logits and hidden states")
        raise RecipeError(f"recipe key 'credit.name': {recipe.credit.name} needs {needs}, which the trainer does not "
                          "collect yet; use it through rewards.credit from Python")
    if recipe.credit is not None and recipe.credit.name not in CREDIT:
        from align.config import _choices

        raise RecipeError("recipe key 'credit.name': " + _choices("unknown credit module", recipe.credit.name,
                                                                 CREDIT.names()))
    recipe.algorithm_spec()  # credit granularity vs estimator, now that credit modules are registered
    if recipe.data.task is not None:
        import inspect

        valid = [p for p in inspect.signature(TASKS.get(recipe.data.task)).parameters
                 if p not in ("train_size", "eval_size", "seed")]
        unknown = sorted(set(recipe.data.task_options) - set(valid))
        if unknown:
            raise RecipeError(f"recipe key 'data.task_options.{unknown[0]}': task {recipe.data.task!r} has no such "
                              f"option; valid options: {', '.join(valid)}")


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
    from align.trainers.checkpoint import latest_checkpoint

    if resume is not True:
        assert resume is not False
        run_dir = Path(resume)
        if latest_checkpoint(run_dir / "checkpoints") is None:
            raise RecipeError(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
        return run_dir
    import re

    own = re.compile(rf"{re.escape(recipe.name)}-\d{{8}}-\d{{6}}(-\d+)?")  # not runs of "<name>-lora" recipes
    candidates = sorted((p for p in Path(recipe.logging.dir).glob(f"{recipe.name}-*") if own.fullmatch(p.name)),
                        key=lambda p: p.stat().st_mtime)
    for run_dir in reversed(candidates):
        if latest_checkpoint(run_dir / "checkpoints") is not None:
            return run_dir
    raise RecipeError(f"--resume: no run of {recipe.name!r} with a checkpoint under {recipe.logging.dir}/")


# ---------------------------------------------------------------------------------------------------------------
# Data, models, rewards
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


def tiny_cache_dir(recipe: Recipe) -> Path:
    root = Path(recipe.model.cache_dir or os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align") / "models"
    return root / f"tiny-{recipe.data.task}-{_tiny_cache_key(recipe)}"


def prepare_base_model(recipe: Recipe, log: Callable[[str], None] = print) -> Path:
    """The model directory to start from: ``model.path``, or a tiny model built offline for the task, warm-started
    with SFT and cached (the cache key covers every setting that shapes it)."""
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
        score = _task_verifier(recipe)
        evaluate = lambda: _greedy(model, tokenizer, val, score, recipe.rollout.max_new_tokens)  # noqa: E731
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


def load_model(path: Path | str, recipe: Recipe) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[recipe.model.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(recipe.model.tokenizer or path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as err:
        raise RecipeError(f"recipe key 'model.path': cannot load {str(path)!r}: {' '.join(str(err).split())[:160]}") \
            from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(torch.device(recipe.runtime.device))  # type: ignore[arg-type]  # transformers types .to oddly
    return model, tokenizer


def _composer(recipe: Recipe, entries: list[Any] | None = None) -> Any:
    from rewards import RewardComposer, RewardTerm

    chosen = recipe.rewards if entries is None else entries
    terms = [RewardTerm(e.name, weight=e.weight, options=e.options, on_failure=e.on_failure, fallback=e.fallback,
                        timeout=e.timeout) for e in chosen]
    return RewardComposer(terms)


def _accuracy_entry(recipe: Recipe) -> Any | None:
    from rewards.adapters import VERIFIERS

    return next((e for e in recipe.rewards if e.name in VERIFIERS), None)


def _task_verifier(recipe: Recipe) -> Callable[..., list[float]]:
    from rewards.adapters import verifier

    entry = _accuracy_entry(recipe)
    if entry is None:
        default = TASKS.info(recipe.data.task)["reward"] if recipe.data.task else "exact_match"
        from align.config import RewardEntry

        entry = RewardEntry(name=default)
    return verifier(_composer(recipe, [entry]))  # type: ignore[no-any-return]


def _greedy(model: Any, tokenizer: Any, data: Any, score: Callable[..., list[float]], max_new_tokens: int) -> float:
    from align.trainers.evaluate import greedy_accuracy

    columns = {c: data[c] for c in data.column_names if c != "prompt"}
    return greedy_accuracy(model, tokenizer, data["prompt"], columns, score, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------------------------
# LoRA and the reference model
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


def reference_fn(model: Any, recipe: Recipe, spec: AlgorithmSpec) -> Callable[[Any], torch.Tensor] | None:
    """Log-probs under the frozen reference: the base model with adapters disabled under LoRA (no second copy),
    else a frozen copy of the initial weights. None when nothing reads a reference."""
    if spec.kl is None:
        return None
    from align.trainers.sequences import response_forward

    temperature = recipe.rollout.temperature
    if recipe.lora.enabled:
        def lora_reference(batch: Any) -> torch.Tensor:
            with torch.no_grad(), model.disable_adapter():
                logp, _, _ = response_forward(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                              batch.mask, temperature=temperature)
            return logp

        return lora_reference
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def copy_reference(batch: Any) -> torch.Tensor:
        with torch.no_grad():
            logp, _, _ = response_forward(frozen, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                          batch.mask, temperature=temperature)
        return logp

    return copy_reference


def _runtime(name: str) -> Callable[..., TrainResult]:
    """A runtime plugged in through the entry-point group ``align.runtimes`` (the Ray runtime lives in ray_jobs,
    the only package allowed to import ray)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="align.runtimes"):
        if ep.name == name:
            try:
                runner: Callable[..., TrainResult] = ep.load()
            except ImportError as err:
                raise RecipeError(f"recipe key 'runtime.backend': the {name} runtime cannot load ({err})") from None
            return runner
    raise RecipeError(f"recipe key 'runtime.backend': no {name!r} runtime is installed (entry point group "
                      "align.runtimes); reinstall the package with `pip install -e .`")


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


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------
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
    from align.runs import run_policy, run_preference

    with torch_threads(config.runtime.threads):
        runner = run_policy if spec.kind == "policy" else run_preference
        if config.runtime.backend == "ray":
            runner = _runtime("ray")
        return runner(config, spec, resume=resume, log=log,
                      progress=config.logging.progress if progress is None else progress)
