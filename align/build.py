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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from align.algorithms import AlgorithmSpec
from align.components import rewards_provider
from align.config import Recipe, RecipeError, choices
from align.data.loading import (
    as_text,
    dataset_splits,
    drop_training_prompts,
    load_prompt_dataset,
    split_held_out,
)
from align.data.tasks import build_task
from align.errors import InputError
from align.models.named import (
    NAMED_MODELS,
    check_named_model,
    is_named_model,
    named_model_dir,
    prepare_named_model,
)
from align.trainers.checkpoint import latest_checkpoint
from align.trainers.critic import ActorCritic
from align.trainers.evaluate import Verifier, greedy_accuracy
from align.trainers.learner import PolicyLearner, PreferenceLearner
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.strategy import Reference, Strategy

CACHE_VERSION = 1
VALUE_LR_FACTOR = 10.0  # a critic's head learns this much faster than the policy unless learner.value_lr says
TINY_NEEDS_A_TASK = ("recipe key 'model.path': 'tiny' builds a model for a synthetic task; set data.task or point "
                     "model.path at a model directory")


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


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
    try:
        run_dir.mkdir(parents=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    except OSError as err:  # align validate checks this up front; the disk may have changed since
        raise RecipeError(f"recipe key 'logging.dir': cannot create the run directory {str(run_dir)!r}: "
                          f"{err.strerror}; point logging.dir at a writable directory") from None
    return run_dir


def check_writable_dir(key: str, path: str | Path) -> None:
    """``path`` is a directory this process can create files in, or can be created: a one-line RecipeError naming
    ``key`` otherwise. Probed by creating (and removing) a directory, because permission bits alone mislead (root
    ignores them; /proc and read-only mounts refuse anyway)."""
    import tempfile

    target = Path(path)
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise RecipeError(f"recipe key {key!r}: {str(existing)!r} is a file, not a directory; point {key} at a "
                          "directory (it is created when missing)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".align-write-check-", dir=existing))
    except OSError as err:
        raise RecipeError(f"recipe key {key!r}: cannot create directories in {str(existing)!r} ({err.strerror}); "
                          f"point {key} at a writable directory") from None


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
    """(train, test) datasets with ``prompt`` and ``answer`` columns; no test prompt is a training prompt."""
    d = recipe.data
    if d.task is not None:
        splits = build_task(d.task, train_size=d.train_size, eval_size=d.eval_size, seed=recipe.seed, **d.task_options)
        return splits["train"], splits["test"]

    def load(path: str, split: str) -> Any:
        return load_prompt_dataset(path, split=split, prompt_column=d.prompt_column, answer_column=d.answer_column,
                                   subset=d.subset, answer_regex=d.answer_regex)

    train, test = train_and_held_out(recipe, load)
    return train.select(range(min(len(train), d.train_size))), test.select(range(min(len(test), d.eval_size)))


def train_and_held_out(recipe: Recipe, load: Callable[[str, str], Any]) -> tuple[Any, Any]:
    """The rows of ``data.path`` to train on and the held-out rows, which share no prompt with them.

    Held out: ``data.eval_path``; else the source's own held-out split (``data.eval_split``, or ``test`` where
    the source has one); else a seeded split (``seed``) of ``data.path`` itself. ``load(path, split)`` reads one
    split of a source (a file is all one split)."""
    d = recipe.data
    assert d.path is not None
    with _recipe_key("data.path"):
        train = load(d.path, d.split)
        if len(train) == 0:
            raise InputError(f"{d.path!r} (split {d.split!r}) has no rows")
    if d.eval_path is not None:
        with _recipe_key("data.eval_path"):
            return train, drop_training_prompts(load(d.eval_path, "test"), train, source=d.eval_path)
    with _recipe_key("data.path"):
        test = _held_out_split(recipe, load)
        if test is None:
            train, test = split_held_out(train, eval_size=d.eval_size, seed=recipe.seed, source=d.path)
        return train, drop_training_prompts(test, train, source=d.path)


@contextmanager
def _recipe_key(key: str) -> Iterator[None]:
    """A data error as a recipe error naming the key that points at the data."""
    try:
        yield
    except InputError as err:
        raise RecipeError(f"recipe key {key!r}: {err}") from None


def _held_out_split(recipe: Recipe, load: Callable[[str, str], Any]) -> Any | None:
    """The held-out split of ``data.path``: ``data.eval_split``, else ``test`` where it has one; None where it has
    none (a file, a single saved dataset, a dataset without a ``test`` split when none was named)."""
    d = recipe.data
    assert d.path is not None
    splits = dataset_splits(d.path, d.subset)
    wanted = d.eval_split or "test"
    if splits is not None and wanted in splits and wanted != d.split:  # the config refuses eval_split == split
        return load(d.path, wanted)
    if d.eval_split is None:
        return None
    has = f"its splits are {', '.join(splits)}" if splits else "it has no splits"
    raise RecipeError(f"recipe key 'data.eval_split': {d.path!r} has no split {wanted!r} ({has}); name one of its "
                      "splits, set data.eval_path, or leave data.eval_split unset for a seeded split")


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
        raise RecipeError(TINY_NEEDS_A_TASK)
    target = tiny_cache_dir(recipe)
    if (target / "config.json").is_file():
        log(f"base model: cached tiny model {target}")
        return target
    from align.models.tiny import build_char_tokenizer, build_tiny_causal_lm
    from align.trainers.sft import sft

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer), tiny_model_config(recipe))
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
    key = "model.tokenizer" if recipe.model.tokenizer else "model.path"
    if not recipe.model.tokenizer and Path(source).is_dir():
        check_model_dir(Path(source))  # an empty directory would otherwise fail here, blaming sentencepiece
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a source it cannot read
        raise RecipeError(f"recipe key {key!r}: cannot load a tokenizer from {source!r}: {_first_line(err)}") \
            from None
    if tokenizer.eos_token is None and tokenizer.pad_token_id is None:
        raise RecipeError(f"recipe key {key!r}: the tokenizer of {source!r} has neither an EOS nor a pad token; "
                          "generation could not stop or pad")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(path: Path | str, recipe: Recipe) -> tuple[Any, Any]:
    """The model in ``model.dtype`` on ``runtime.device``, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, recipe)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[recipe.model.dtype]
    if Path(path).is_dir():
        check_model_dir(Path(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as err:  # a missing, torn or foreign config or weight file
        raise RecipeError(f"recipe key 'model.path': cannot load {str(path)!r}: {_first_line(err)}") from None
    model.to(torch.device(recipe.runtime.device))  # type: ignore[arg-type]  # transformers types .to oddly
    return model, tokenizer


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def check_model_dir(path: Path, key: str = "model.path") -> None:
    """A directory given as a model holds what ``from_pretrained`` reads: ``config.json`` and weights (or is a PEFT
    adapter, with ``adapter_config.json``); otherwise one line naming what is missing."""
    if (path / "adapter_config.json").is_file():
        return
    has_weights = any(next(path.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)
    missing = [what for what, present in (("config.json", (path / "config.json").is_file()),
                                          ("weights (*.safetensors or pytorch_model.bin)", has_weights)) if not present]
    if missing:
        raise RecipeError(f"recipe key {key!r}: {str(path)!r} is not a model directory: it has no "
                          f"{' and no '.join(missing)}; point {key} at a Hugging Face model directory (config.json, "
                          "tokenizer and weight files), a named model (align list) or 'tiny'")


def load_model_config(path: Path | str, key: str = "model.path") -> Any:
    """The model's configuration, without its weights (for ``align validate``)."""
    from transformers import AutoConfig

    local = Path(path)
    if local.is_dir():
        check_model_dir(local, key)
    elif _looks_like_a_file_path(str(path)):
        raise RecipeError(f"recipe key {key!r}: {str(path)!r} does not exist; point {key} at a model directory, a "
                          "named model (align list), 'tiny' or a hub id (org/name)")
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a config it cannot read
        where = "" if local.is_dir() else " (not a local directory; the hub is offline or does not have it)"
        raise RecipeError(f"recipe key {key!r}: cannot read the model configuration of {str(path)!r}{where}: "
                          f"{_first_line(err)}") from None


def _looks_like_a_file_path(text: str) -> bool:
    """A path, not a hub id ("org/name"): absolute, relative with ./ or ~, or deeper than one slash."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def model_skeleton(config: Any, key: str = "model.path") -> Any:
    """The causal LM a configuration describes, on the meta device: its modules, no memory and no weights."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # an architecture transformers cannot build as a causal LM
        raise RecipeError(f"recipe key {key!r}: its configuration ({type(config).__name__}) does not build a causal "
                          f"language model: {_first_line(err)}") from None


def tiny_model_config(recipe: Recipe) -> Any:
    from align.models.tiny import TinyModelConfig

    t = recipe.model.tiny
    return TinyModelConfig(hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                           intermediate_size=t.intermediate_size, seed=recipe.seed)


def check_base_model(recipe: Recipe) -> Any:
    """What preparing and loading the base model, its tokenizer and its LoRA adapter would refuse, found without
    loading or building weights. Returns the tokenizer, or None for a named model that is not converted yet (its
    package is checked instead)."""
    path = recipe.model.path
    if path == "tiny":
        from align.models.tiny import build_char_tokenizer

        if recipe.data.task is None:
            raise RecipeError(TINY_NEEDS_A_TASK)
        tokenizer = load_tokenizer(path, recipe) if recipe.model.tokenizer else build_char_tokenizer()
        check_lora_targets(lambda: _tiny_skeleton(recipe, len(build_char_tokenizer())), recipe)
        return tokenizer
    if is_named_model(path) and not (named_model_dir(path, cache_root(recipe)) / "config.json").is_file():
        try:
            check_named_model(path)
        except InputError as err:
            raise RecipeError(f"recipe key 'model.path': {err}") from None
        from transformers import AutoConfig

        check_lora_targets(lambda: model_skeleton(AutoConfig.for_model(NAMED_MODELS[path].model_type)), recipe)
        return load_tokenizer(path, recipe) if recipe.model.tokenizer else None
    directory = named_model_dir(path, cache_root(recipe)) if is_named_model(path) else path
    config = load_model_config(directory)
    tokenizer = load_tokenizer(directory, recipe)
    if not (Path(directory) / "adapter_config.json").is_file():
        check_lora_targets(lambda: model_skeleton(config), recipe)
    return tokenizer


def _tiny_skeleton(recipe: Recipe, vocab_size: int) -> Any:
    from align.models.tiny import build_tiny_causal_lm

    with torch.device("meta"):
        return build_tiny_causal_lm(vocab_size, tiny_model_config(recipe))


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

    check_lora_targets(lambda: model, recipe)
    config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=list(recipe.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def check_lora_targets(build: Callable[[], Any], recipe: Recipe) -> None:
    """Under LoRA, every ``lora.target_modules`` entry names modules of the model ``build()`` returns (by the last
    part of their dotted names). ``build`` is called only under LoRA: even a skeleton imports its architecture,
    seconds that a recipe without LoRA need not spend."""
    if not recipe.lora.enabled:
        return
    module = build()
    names = {n.split(".")[-1] for n, _ in module.named_modules()}
    missing = [m for m in recipe.lora.target_modules if m not in names]
    if missing:
        linear = sorted({n.split(".")[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)})
        raise RecipeError("recipe key 'lora.target_modules': " + choices("the model has no module named", missing[0],
                                                                         linear))


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
    algorithm reads one. An algorithm with a critic trains ``model`` wrapped with a value head
    (:class:`~align.trainers.critic.ActorCritic`, its head at ``learner.value_lr``, else VALUE_LR_FACTOR x lr: a
    zero-initialised head at an RLHF policy's lr would hardly move); ``model`` itself stays the
    policy that the engine samples and the run saves."""
    learner = recipe.learner
    reference = Reference(model, lora=recipe.lora.enabled) if spec.has_reference else None
    if spec.value_loss is not None:  # after the reference: a frozen copy of the policy needs no value head
        model = ActorCritic(model)
    value_lr = learner.value_lr
    if spec.value_loss is not None and value_lr is None:
        value_lr = VALUE_LR_FACTOR * learner.lr
    optimizer = build_optimizer(model, lr=learner.lr, weight_decay=learner.weight_decay, betas=learner.betas,
                                value_lr=value_lr)
    scheduler = build_scheduler(optimizer, kind=learner.scheduler, warmup_steps=learner.warmup_steps,
                                total_steps=learner.steps)
    applied = strategy(model, optimizer, scheduler)
    if spec.kind == "preference":
        return PreferenceLearner(spec, applied, reference, micro_batch_size=learner.micro_batch_size,
                                 precision=learner.mixed_precision)
    return PolicyLearner(spec, applied, reference if spec.kl is not None else None,
                         temperature=recipe.rollout.temperature, micro_batch_size=learner.micro_batch_size,
                         updates_per_batch=learner.updates_per_batch, precision=learner.mixed_precision,
                         share_prompt=learner.share_prompt)


def engine_name(recipe: Recipe) -> str:
    """``rollout.engine``, with ``auto`` resolved: vLLM when installed and the device is a GPU, else transformers
    ``generate`` (on a CPU a small model samples faster with it)."""
    from importlib.util import find_spec

    if recipe.rollout.engine != "auto":
        return recipe.rollout.engine
    return "vllm" if find_spec("vllm") is not None and recipe.runtime.device.startswith("cuda") else "hf"


VLLM_MAX_MODEL_LEN = 2048  # ray_jobs/rollout_vllm.py VLLMRolloutEngine's default max_model_len (align cannot import it)


def engine_context(recipe: Recipe) -> int | None:
    """The rollout engine's context length, prompt included, where it has one (vLLM's ``max_model_len``): a
    multi-turn episode is cut there instead of failing in the engine. None: no fixed limit (transformers)."""
    if engine_name(recipe) != "vllm":
        return None
    return int(recipe.rollout.engine_options.get("max_model_len", VLLM_MAX_MODEL_LEN))


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
