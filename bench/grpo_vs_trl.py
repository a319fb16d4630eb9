"""GRPO iteration throughput and memory, this toolkit's policy workload and learner vs TRL's GRPOTrainer, side by side.

Both trainers get the same offline model (loaded from the same files), the same prompts and reward function, G
samples per prompt, the same max new tokens, AdamW with the same learning rate, clipping and schedule, the same
generation engine (transformers ``generate``, sampling at temperature 1) and the same objective (GRPO: group-normalised
advantages, PPO clip 0.2, per-sequence token mean, no KL so no reference model). TRL gets its fastest settings:
gradient checkpointing off, beta=0 (no reference model), fused AdamW (its default), no logging or saving inside the
timed steps. ``--precision bf16`` turns on bf16 autocast on both sides (TRL's default ``bf16=True``; ours
``learner.mixed_precision: bf16``); ``--attn`` picks the attention kernel of the shared model (eager is faster than
sdpa for short sequences in bf16 on this CPU).

Timing: an iteration is the wall time between the ends of two consecutive optimiser steps (sampling, reward, loss,
backward, optimiser step and any bookkeeping included). ``update`` is the iteration minus the time inside
``model.generate`` and inside the reward function, measured by the same wrappers on both sides. The first
``--warmup`` steps of each run are discarded; runs alternate between the two trainers (ours, TRL, TRL, ours, ...)
and the figures are medians over all measured steps.

Memory (``--memory``): each trainer runs in its own process; the peak resident set size during the training steps
(after model load and trainer construction; the kernel's high-water mark is reset just before) is compared.

Prompts (``--prompt-format``): the arithmetic task's prompts as plain text (``"87+42="``, the character-level
models), or asked as a question in one user turn of the tokenizer's chat template (``chat``, ``"What is 87+42?"``;
the default for the real model, SmolLM2-135M-Instruct, whose template adds its default system turn: 38-39
tokens). Both sides get the same rendered strings; ours encodes them without special tokens, TRL with its tokenizer
call, and every prompt row that reaches either side's ``generate`` is checked against the shared encoding (a
mismatch stops the run), so the same token ids reach both trainers.

LoRA (``--lora``): r 16, alpha 32, dropout 0 on q_proj, k_proj, v_proj, o_proj on both sides: ours through the
toolkit's own path (a recipe's ``lora`` section, ``align.build.apply_lora`` and ``make_learner``, as the local
runtime builds them), TRL through ``GRPOTrainer(peft_config=LoraConfig(...))``. Our learner is what a recipe gets by
default (``learner.micro_batch_size`` 64, trimmed micro-batches, ``learner.share_prompt`` on).

FLOP/s of the update, against the machine's GEMM peak (``bench/gemm_peak.py``, measured in this process after the
runs at the run's precision, fp32 or bf16, or read from ``--gemm-peak JSON``). Per training step, with N the
non-embedding parameters of the base model (every decoder layer and norm; the token embedding and the LM head,
tied on SmolLM2, excluded), A the LoRA adapter's parameters (0 without LoRA), H = vocabulary x hidden (the LM head)::

    tokens       = prompt tokens + completion tokens of every row sampled that step (padding excluded; completions
                   up to and including the first EOS), counted the same way on both sides, from generate's inputs
                   and outputs. Rows our learner skips (groups whose advantages are all 0) still count.
    model_flops  = ((2 + b) * N + 6 * A) * tokens, b = 4 for a full fine-tune (activation and weight gradients),
                   b = 2 under LoRA (activation gradients through every layer, no base weight gradients); the
                   adapter's own products count 2 forward + 4 backward. This is the work of one unshared, unpadded
                   forward + backward over the step's sequences: sharing the prompt or skipping inert rows shows as
                   a higher effective FLOP/s.
    extra_nograd = 2 * (N + A) * decoder positions run without gradient outside generate (old-policy or
                   reference log-probs; counted as run, padding included). 0 on both sides here: one optimiser step
                   per generation, beta 0.
    update_flops = model_flops + extra_nograd;  update FLOP/s = update_flops / update seconds (per step, median).
    lm_head      = (2 + 2 [+ 2 when the head's weight trains, i.e. a full fine-tune]) * H * completion tokens, the
                   scored positions: reported apart, not in update_flops.
    executed     = what the side really ran, from forward hooks on the decoder and the LM head: ((2 + b) * N + 6 *
                   A) * decoder positions run with gradient (padding included, a shared prompt once per group) +
                   extra_nograd + (2 + 2 [+ 2] [+ 2 for TRL]) * H * LM-head positions. TRL's fused LM head scores
                   every position of prompt + completion on a CPU (it keeps only the completion's on CUDA/XPU) and
                   recomputes the head's product in its backward (the last + 2).

Attention's score and value products (4 * sequence * hidden per token and layer, ~2% here), element-wise ops,
the loss and the optimiser step are not counted, but their time is in the update's: a fraction of peak says how
far the whole update runs from the counted products alone at the machine's best GEMM rate.

    python bench/grpo_vs_trl.py                       # the figures in docs/benchmarks.md
    python bench/grpo_vs_trl.py --size tiny --rounds 1 --steps 2 --warmup 1 --max-new-tokens 8   # smoke test
    python bench/grpo_vs_trl.py --size smollm2 --lora --prompts 2 --group-size 4 --max-new-tokens 32   # real model
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REAL_MODELS,
    Result,
    Stopwatch,
    arithmetic_prompts,
    base_parser,
    describe_model,
    exact_reward,
    interleave,
    iqr,
    load_model,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    set_threads,
    shaped_reward,
    step_end_clock,
    versions,
    write_json,
)


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


LORA = LoraSpec()  # on both sides: our recipe's lora section and TRL's LoraConfig get these values
# extra products of TRL's fused LM head backward (trl.kernels.chunked_logprob.ChunkedLogProbFunction recomputes
# each logits tile before turning it into a gradient): 2 FLOPs per head parameter and position
TRL_HEAD_RECOMPUTE = 2


@dataclass
class Settings:
    size: str
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    lr: float
    attn: str = "sdpa"  # transformers attention kernel, the same for both sides
    reward: str = "shaped"  # "shaped" (dense) or "exact" (binary), the same plain function for both sides
    precision: Literal["no", "bf16"] = "no"  # "bf16": bf16 autocast on both sides (TRL's bf16=True, ours
    # learner.mixed_precision)
    seed: int = 0
    lora: bool = False  # LoRA (LORA) on both sides instead of a full fine-tune
    prompt_format: str = "auto"  # "plain", "chat" (a user turn in the chat template), "auto": chat for a real model

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def chat(self) -> bool:
        return self.prompt_format == "chat" or (self.prompt_format == "auto" and self.size in REAL_MODELS)


@dataclass
class Work:
    """What one training step ran, counted by the same hooks on both sides (a position: one row x one column)."""

    rows: int = 0  # completions sampled
    prompt_tokens: int = 0  # real prompt tokens of those rows (left padding excluded)
    completion_tokens: int = 0  # sampled tokens up to and including the first EOS
    grad_positions: int = 0  # decoder positions run with gradient outside generate (padding included)
    nograd_positions: int = 0  # decoder positions run without gradient outside generate (old / reference log-probs)
    head_positions: int = 0  # positions through the LM head outside generate
    foreign_prompt_rows: int = 0  # prompt rows whose ids are not the shared encoding of any prompt

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class StepTime:
    iteration: float
    generate: float
    reward: float
    skipped_rows: float = 0.0  # ours: the share of rows whose group was inert (all advantages exactly 0)
    work: Work = field(default_factory=Work)

    @property
    def update(self) -> float:
        return self.iteration - self.generate - self.reward


class WorkCounter:
    """Counts :class:`Work` through hooks on the model's decoder and LM head and a wrapper around ``generate``
    (positions seen inside ``generate`` are sampling, not update work). :meth:`take` returns the counts since the
    last call."""

    def __init__(self, model: Any, expected_prompts: set[tuple[int, ...]], eos_ids: set[int]) -> None:
        self.work = Work()
        self.expected, self.eos_ids = expected_prompts, sorted(eos_ids)
        self.in_generate = False
        model.base_model.register_forward_pre_hook(self._on_decoder, with_kwargs=True)
        model.get_output_embeddings().register_forward_hook(self._on_head)

    def take(self) -> Work:
        work, self.work = self.work, Work()
        return work

    def _on_decoder(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        if self.in_generate:
            return
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        if x is None:
            raise RuntimeError("the decoder was called without input_ids or inputs_embeds; cannot count its positions")
        positions = int(x.shape[0] * x.shape[1])  # (B, L) ids or (B, L, hidden) embeddings
        if torch.is_grad_enabled():
            self.work.grad_positions += positions
        else:
            self.work.nograd_positions += positions

    def _on_head(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        if not self.in_generate:
            self.work.head_positions += int(output.shape[:-1].numel())  # (B, kept, V) logits

    def count_head(self, positions: int) -> None:
        """Head positions of an LM head that bypasses the module's forward (TRL's fused head)."""
        if not self.in_generate:
            self.work.head_positions += positions

    def around_generate(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        import torch

        def counted(*args: Any, **kwargs: Any) -> Any:
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]  # (B, P) left-padded, both sides pass keywords
            self.in_generate = True
            try:
                out = generate(*args, **kwargs)
            finally:
                self.in_generate = False
            new = getattr(out, "sequences", out)[:, ids.shape[1]:]  # (B, T)
            is_eos = torch.isin(new, torch.tensor(self.eos_ids)).long()
            ends = torch.where(is_eos.any(-1), is_eos.argmax(-1) + 1, new.shape[1])  # (B,) through the first EOS
            self.work.rows += int(ids.shape[0])
            self.work.prompt_tokens += int(mask.sum())
            self.work.completion_tokens += int(ends.sum())
            self.work.foreign_prompt_rows += sum(tuple(row[m.bool()].tolist()) not in self.expected
                                                 for row, m in zip(ids, mask, strict=True))
            return out

        return counted


@dataclass
class Setup:
    """What both sides start from."""

    model: Any
    tokenizer: Any
    prompts: list[str]  # as rendered for the model (chat template applied when s.chat)
    answers: list[str]
    gen_clock: Stopwatch
    reward_clock: Stopwatch
    counter: WorkCounter


def render_prompts(prompts: list[str], tokenizer: Any, chat: bool) -> list[str]:
    """Each prompt as given (``"87+42="``), or asked as a question (``"What is 87+42?"``) in one user turn of the
    tokenizer's chat template with the assistant turn opened (what ``data.chat_template: true`` renders). The
    question matters for an instruction model: sampled at temperature 1, SmolLM2-135M-Instruct answers a bare
    ``"87+42="`` mostly with prose without digits, so whole groups score 0, and our learner skips such inert groups
    while TRL trains on them; asked the question it writes numbers, and the shaped reward separates the samples."""
    if not chat:
        return prompts
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("--prompt-format chat: this model's tokenizer has no chat template; use --prompt-format plain")
    from align.data.loading import as_text

    return [as_text([{"role": "user", "content": f"What is {p.removesuffix('=')}?"}], tokenizer,
                    add_generation_prompt=True) for p in prompts]


def _common_setup(s: Settings) -> Setup:
    """The seeded model and tokenizer, the rendered prompts, the two stopwatches (the generation one around
    ``model.generate``) and the work counter. Hooks and wrappers go on the base model before any LoRA wrapping:
    PEFT keeps the decoder and head modules, and its ``generate`` ends in the base model's."""
    import torch

    from align.trainers.sequences import encode

    torch.manual_seed(s.seed)
    model, tokenizer = load_model(s.size, s.attn)
    plain, answers = arithmetic_prompts(256, s.seed)
    prompts = render_prompts(plain, tokenizer, s.chat)
    eos = model.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [] if eos is None else [eos])}
    counter = WorkCounter(model, {tuple(ids) for ids in encode(tokenizer, prompts)}, eos_ids)
    gen_clock, reward_clock = Stopwatch(), Stopwatch()
    model.generate = gen_clock.wrap(counter.around_generate(model.generate))
    return Setup(model, tokenizer, prompts, answers, gen_clock, reward_clock, counter)


# -- this toolkit ------------------------------------------------------------------------------------------------
def recipe_for(s: Settings, steps: int) -> Any:
    """The recipe a user would write for this run; its defaults give the learner (micro-batches, share_prompt)."""
    from align.config import Recipe

    return Recipe.model_validate({
        "seed": s.seed,
        "algorithm": {"preset": "grpo", "overrides": {"kl": None, "kl_coef": 0.0}},  # TRL's beta=0, loss "grpo"
        "rewards": [{"name": "exact_match"}],  # the schema asks for one; the benchmark scores with REWARDS
        "rollout": {"samples_per_prompt": s.group_size, "prompts_per_step": s.prompts_per_step,
                    "max_new_tokens": s.max_new_tokens, "temperature": 1.0},
        "learner": {"lr": s.lr, "steps": steps, "weight_decay": 0.0, "betas": [0.9, 0.999], "scheduler": "constant",
                    "max_grad_norm": 1.0, "mixed_precision": s.precision},
        "lora": {"enabled": s.lora, "r": LORA.r, "alpha": LORA.alpha, "dropout": LORA.dropout,
                 "target_modules": list(LORA.target_modules)},
    })


def run_ours(s: Settings, steps: int, on_ready: Any = None) -> list[StepTime]:
    """The local runtime's step, driven without a run directory: the recipe's LoRA and learner
    (:func:`align.build.apply_lora`, :func:`align.build.make_learner` with a :class:`TorchStrategy`), then
    :class:`PolicyWorkload` (sampler, HF engine, reward, advantages) feeds the learner, then the weight sync (a
    version bump)."""
    import torch

    from align.build import apply_lora, make_learner, seed_everything
    from align.trainers.learner import InProcessLearner
    from align.trainers.protocols import RewardResult, Rollout, SamplingParams
    from align.trainers.rollout_hf import HFRolloutEngine
    from align.trainers.sampler import PromptSampler
    from align.trainers.strategy import TorchStrategy
    from align.trainers.workload import PolicyWorkload

    setup = _common_setup(s)
    reward_clock = setup.reward_clock

    def score(rollout: Rollout, step: int) -> RewardResult:
        values = torch.tensor(REWARDS[s.reward](rollout.completions, rollout.columns["answer"]), dtype=torch.float64)
        return RewardResult(rewards=values, valid=torch.ones(len(values), dtype=torch.bool),
                            per_reward={"shaped": values}, metrics={})

    recipe = recipe_for(s, steps)
    spec = recipe.algorithm_spec()
    seed_everything(recipe.seed)  # as align.build.policy_model: the adapter's initialisation follows the seed
    model = apply_lora(setup.model, recipe)
    learner = InProcessLearner(make_learner(
        recipe, spec, model,
        lambda m, optimizer, scheduler: TorchStrategy(m, optimizer, scheduler, recipe.learner.max_grad_norm)))
    engine = HFRolloutEngine(model, setup.tokenizer, precision=s.precision)  # samples under the learner's autocast
    workload = PolicyWorkload(spec=spec, engine=engine, rewards=reward_clock.wrap(score), learner=learner,
                              prompts=setup.prompts, columns={"answer": setup.answers},
                              sampler=PromptSampler(len(setup.prompts), s.seed), prompts_per_step=s.prompts_per_step,
                              samples_per_prompt=s.group_size,
                              sampling=SamplingParams(max_new_tokens=s.max_new_tokens, temperature=1.0))
    if on_ready is not None:
        on_ready()
    times = []
    version = 0
    setup.counter.take()
    last = time.perf_counter()
    for step in range(1, steps + 1):
        collected = workload.collect(step, version, prefetch=step != steps)
        metrics = dict(collected.metrics)
        if collected.batch is not None:
            metrics.update(learner.step(collected.batch))
            version += 1
            engine.sync_weights(model, version)
        now = time.perf_counter()
        times.append(StepTime(now - last, setup.gen_clock.take(), reward_clock.take(),
                              metrics.get("update/skipped_rows_frac", 0.0), setup.counter.take()))
        last = now
    return times


# -- TRL ---------------------------------------------------------------------------------------------------------
def _count_trl_head(counter: WorkCounter) -> None:
    """TRL's fused LM head calls ``ChunkedLogProbFunction.apply(hidden (N, H), ...)`` instead of the head module:
    count its N positions (a wrapper that only counts; the function itself is unchanged)."""
    import trl.trainer.utils as trl_utils

    function = trl_utils._ChunkedLogProbFunction
    original = getattr(function, "_bench_original", function)

    class Counted:
        _bench_original = original

        @staticmethod
        def apply(hidden: Any, *args: Any, **kwargs: Any) -> Any:
            counter.count_head(int(hidden.shape[0]))
            return original.apply(hidden, *args, **kwargs)

    trl_utils._ChunkedLogProbFunction = Counted  # type: ignore[misc,assignment]


def run_trl(s: Settings, steps: int, on_ready: Any = None) -> list[StepTime]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    setup = _common_setup(s)
    gen_clock, reward_clock = setup.gen_clock, setup.reward_clock
    _count_trl_head(setup.counter)

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return REWARDS[s.reward](completions, answer)

    def ready() -> None:
        setup.counter.take()
        if on_ready is not None:
            on_ready()

    times: list[StepTime] = []
    clock = step_end_clock(lambda seconds: times.append(StepTime(seconds, gen_clock.take(), reward_clock.take(),
                                                                 work=setup.counter.take())), on_begin=ready)
    peft_config = None
    if s.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                 target_modules=list(LORA.target_modules), task_type="CAUSAL_LM")

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=s.batch, gradient_accumulation_steps=1,
            num_generations=s.group_size, max_completion_length=s.max_new_tokens, learning_rate=s.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
            optim="adamw_torch_fused", max_grad_norm=1.0, beta=0.0, loss_type="grpo", scale_rewards="group",
            epsilon=0.2,
            temperature=1.0, top_p=1.0, top_k=0, gradient_checkpointing=False, bf16=s.precision == "bf16", fp16=False,
            use_cpu=True,
            logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, seed=s.seed,
            dataloader_num_workers=0, log_completions=False,
        )
        trainer = GRPOTrainer(model=setup.model, reward_funcs=reward_clock.wrap(reward), args=args,
                              train_dataset=Dataset.from_dict({"prompt": setup.prompts, "answer": setup.answers}),
                              processing_class=setup.tokenizer, callbacks=[clock], peft_config=peft_config)
        trainer.train()
    return times


RUNNERS = {"ours": run_ours, "trl": run_trl}
REWARDS = {"shaped": shaped_reward, "exact": exact_reward}


# -- FLOPs -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Parameter counts the FLOPs are counted with (see the module docstring)."""

    body: int  # N: non-embedding parameters of the base model
    head: int  # H: vocabulary x hidden, the LM head's product per position
    adapter: int  # A: LoRA parameters (0 without LoRA)
    hidden: int
    intermediate: int


def model_sizes(size: str, lora: bool) -> Sizes:
    model, _ = load_model(size)
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    head = model.get_output_embeddings().weight.numel()
    adapter = 0
    if lora:
        import torch

        for name, module in model.named_modules():
            if name.split(".")[-1] in LORA.target_modules and isinstance(module, torch.nn.Linear):
                adapter += LORA.r * (module.in_features + module.out_features)  # A (r x in) + B (out x r)
    return Sizes(body, head, adapter, model.config.hidden_size, model.config.intermediate_size)


def step_flops(work: Work, sizes: Sizes, lora: bool, side: str) -> dict[str, float]:
    """One step's FLOPs, by the counts of the module docstring."""
    backward = 2 if lora else 4
    per_position = (2 + backward) * sizes.body + 6 * sizes.adapter
    head_factor = 4 if lora else 6  # forward + activation gradient (+ weight gradient of the trained head)
    model_flops = float(per_position * work.tokens)
    extra = 2.0 * (sizes.body + sizes.adapter) * work.nograd_positions
    recompute = TRL_HEAD_RECOMPUTE if side == "trl" else 0
    executed = (per_position * work.grad_positions + extra
                + (head_factor + recompute) * sizes.head * work.head_positions)
    return {"model_flops": model_flops, "extra_nograd_flops": extra, "update_flops": model_flops + extra,
            "lm_head_flops": float(head_factor * sizes.head * work.completion_tokens),
            "executed_flops": float(executed)}


def read_gemm_peak(path: str, dtype: str) -> dict[str, Any]:
    """bench/gemm_peak.py's figures from its JSON file (checked before the runs: a bad path fails at once)."""
    try:
        payload = json.loads(Path(path).read_text())
        figures: dict[str, Any] = next(r["figures"] for r in payload["results"] if r["name"] == "gemm_peak")
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise SystemExit(f"--gemm-peak {path}: not a JSON file written by bench/gemm_peak.py") from None
    if dtype not in figures:
        raise SystemExit(f"--gemm-peak {path}: has no {dtype} peak; rerun bench/gemm_peak.py with --dtypes {dtype}")
    import torch

    if figures.get("torch_threads") != torch.get_num_threads():
        print(f"note: the GEMM peak in {path} was measured with {figures.get('torch_threads')} thread(s), this run "
              f"uses {torch.get_num_threads()}", flush=True)
    return {**figures, "source": path}


def measure_gemm_peak(args: Any, dtype: str, sizes: Sizes, tokens: int) -> dict[str, Any]:
    """The GEMM peak at ``dtype``, measured in this process (bench/gemm_peak.py) on squares and on the model's own
    MLP shapes over ``tokens`` rows."""
    from bench.gemm_peak import measure_peak

    shapes = ((tokens, sizes.hidden, sizes.intermediate), (tokens, sizes.intermediate, sizes.hidden))
    print(f"measuring the {dtype} GEMM peak (bench/gemm_peak.py)", flush=True)
    try:
        squares = tuple(int(x) for x in args.gemm_sizes.split(",") if x)
    except ValueError:
        raise SystemExit(f"--gemm-sizes: {args.gemm_sizes!r} is not a comma-separated list of integers") from None
    figures = measure_peak((dtype,), squares, shapes, repeats=args.gemm_repeats, min_seconds=args.gemm_min_seconds)
    return {**figures, "source": "measured in this process after the runs"}


def flop_figures(times: list[StepTime], sizes: Sizes, lora: bool, side: str, peak: float) -> dict[str, Any]:
    """Medians (and IQRs) over the measured steps of the work and of the FLOP/s of the update."""
    per_step = [step_flops(t.work, sizes, lora, side) for t in times]
    update_rate = [f["update_flops"] / t.update for f, t in zip(per_step, times, strict=True)]
    head_rate = [(f["update_flops"] + f["lm_head_flops"]) / t.update for f, t in zip(per_step, times, strict=True)]
    executed_rate = [f["executed_flops"] / t.update for f, t in zip(per_step, times, strict=True)]
    work = {key: median([float(getattr(t.work, key)) for t in times])
            for key in ("rows", "prompt_tokens", "completion_tokens", "grad_positions", "nograd_positions",
                        "head_positions")}
    return {
        "work_per_step": work,
        "flops_per_step": {key: median([f[key] for f in per_step]) for key in per_step[0]} if per_step else {},
        "update_flop_per_s": median(update_rate), "update_flop_per_s_iqr": iqr(update_rate),
        "update_peak_frac": median(update_rate) / peak,
        "update_with_head_flop_per_s": median(head_rate), "update_with_head_peak_frac": median(head_rate) / peak,
        "executed_flop_per_s": median(executed_rate), "executed_flop_per_s_iqr": iqr(executed_rate),
        "executed_peak_frac": median(executed_rate) / peak,
        "foreign_prompt_rows": sum(t.work.foreign_prompt_rows for t in times),
    }


# -- throughput ----------------------------------------------------------------------------------------------------
def throughput(s: Settings, rounds: int, steps: int, warmup: int, args: Any) -> Result:
    dtype = "bf16" if s.precision == "bf16" else "fp32"  # the GEMM peak at the run's precision
    peaks = read_gemm_peak(args.gemm_peak, dtype) if args.gemm_peak else None
    measured = interleave(lambda name: RUNNERS[name](s, warmup + steps), rounds, warmup,
                          lambda kept: f"iteration {median([t.iteration for t in kept]):.3f}s")
    foreign = {name: sum(t.work.foreign_prompt_rows for t in times) for name, times in measured.items()}
    if any(foreign.values()):
        raise SystemExit(f"prompt token ids differ between the sides: rows not in the shared encoding {foreign}")
    sizes = model_sizes(s.size, s.lora)
    if peaks is None:
        tokens = int(median([float(t.work.tokens) for times in measured.values() for t in times]))
        peaks = measure_gemm_peak(args, dtype, sizes, max(tokens, 1))
    peak = float(peaks[dtype]["peak_flop_per_s"])
    figures: dict[str, Any] = {}
    for name, times in measured.items():
        it = [t.iteration for t in times]
        up = [t.update for t in times]
        figures[name] = {
            "iteration_s": median(it), "iteration_iqr": iqr(it), "generate_s": median([t.generate for t in times]),
            "reward_s": median([t.reward for t in times]), "update_s": median(up), "update_iqr": iqr(up),
            "completions_per_s": s.batch / median(it), "update_completions_per_s": s.batch / median(up),
            "steps_measured": len(times), **flop_figures(times, sizes, s.lora, name, peak),
        }
        if name == "ours":
            figures[name]["skipped_rows_frac"] = sum(t.skipped_rows for t in times) / max(len(times), 1)
    figures["ratio_iteration"] = figures["ours"]["completions_per_s"] / figures["trl"]["completions_per_s"]
    figures["ratio_update"] = figures["ours"]["update_completions_per_s"] / figures["trl"]["update_completions_per_s"]
    figures["ratio_executed_flops"] = (figures["ours"]["flops_per_step"]["executed_flops"]
                                       / figures["trl"]["flops_per_step"]["executed_flops"])
    figures["gemm_peak"] = {"dtype": dtype, "peak_flop_per_s": peak, "best": peaks[dtype].get("best"),
                            "torch_threads": peaks.get("torch_threads"), "source": peaks["source"],
                            **({"fp32_peak_flop_per_s": peaks["fp32"]["peak_flop_per_s"]}
                               if dtype != "fp32" and "fp32" in peaks else {})}
    extra = {"rounds": rounds, "steps": steps, "warmup": warmup, "flop_counting": FLOP_COUNTING,
             "parameters": {"non_embedding": sizes.body, "lm_head": sizes.head, "lora_adapter": sizes.adapter}}
    return Result("grpo_throughput_vs_trl", figures, _settings(s, **extra))


FLOP_COUNTING = (
    "tokens = prompt + completion tokens of every sampled row (padding excluded, completions through the first "
    "EOS, skipped rows included); N = non-embedding parameters, A = LoRA parameters, H = vocab x hidden; "
    "model_flops = ((2 + b) N + 6 A) tokens with b = 4 full fine-tune, 2 LoRA; extra_nograd_flops = 2 (N + A) x "
    "decoder positions run without grad outside generate; update_flops = model_flops + extra_nograd_flops; "
    "lm_head_flops = (4 LoRA | 6 full) H x completion tokens (not in update_flops); executed_flops = ((2 + b) N + "
    "6 A) x decoder positions run with grad (padding included, shared prompts once) + extra_nograd_flops + (4 | 6, "
    "+2 for TRL's recomputing fused head) H x LM-head positions run; FLOP/s = flops / update seconds, per step, "
    "median; peak_frac = FLOP/s / the GEMM peak (bench/gemm_peak.py) at the run's precision")


# -- memory --------------------------------------------------------------------------------------------------------
def child_memory(name: str, s: Settings, steps: int) -> dict[str, float]:
    """Run one trainer in this process; its peak RSS during the steps (the high-water mark reset when ready)."""
    before: dict[str, float] = {}

    def ready() -> None:
        before["rss"] = rss_bytes()
        reset_peak_rss()

    RUNNERS[name](s, steps, on_ready=ready)
    return {"rss_before_steps_mb": before["rss"] / 2**20, "peak_rss_mb": peak_rss_bytes() / 2**20,
            "peak_increase_mb": (peak_rss_bytes() - before["rss"]) / 2**20}


def memory(s: Settings, steps: int, args: Any) -> Result:
    figures: dict[str, Any] = {}
    for name in ("ours", "trl"):
        cmd = [sys.executable, __file__, "--child-memory", name, "--size", s.size, "--prompts", str(s.prompts_per_step),
               "--group-size", str(s.group_size), "--max-new-tokens", str(s.max_new_tokens), "--steps", str(steps),
               "--precision", s.precision, "--attn", s.attn, "--reward", s.reward,
               "--prompt-format", s.prompt_format, *(["--lora"] if s.lora else [])]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        figures[name] = json.loads(out.strip().splitlines()[-1])
    figures["ratio_peak_rss"] = figures["ours"]["peak_rss_mb"] / figures["trl"]["peak_rss_mb"]
    figures["ratio_peak_increase"] = figures["ours"]["peak_increase_mb"] / figures["trl"]["peak_increase_mb"]
    return Result("grpo_peak_rss_vs_trl", figures, _settings(s, steps=steps))


def _settings(s: Settings, **extra: Any) -> dict[str, Any]:
    import torch

    return {"model": describe_model(s.size), "prompts_per_step": s.prompts_per_step, "G": s.group_size,
            "completions_per_step": s.batch, "max_new_tokens": s.max_new_tokens, "lr": s.lr,
            "precision": s.precision, "attention": s.attn, "reward": s.reward,
            "prompt_format": "chat template (user turn)" if s.chat else "plain text",
            "fine_tune": f"LoRA r{LORA.r} alpha {LORA.alpha} on {','.join(LORA.target_modules)}" if s.lora
            else "full", "torch_threads": torch.get_num_threads(),
            "versions": versions(), **extra}


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="G: samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no",
                        help="bf16: bf16 autocast on both sides (TRL's default bf16=True)")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel (both sides)")
    parser.add_argument("--reward", choices=["shaped", "exact"], default="shaped",
                        help="shaped: dense digit-share reward; exact: binary exact match (use with --size quickstart)")
    parser.add_argument("--lora", action="store_true",
                        help="LoRA r16 alpha32 on q,k,v,o on both sides instead of a full fine-tune")
    parser.add_argument("--prompt-format", choices=["auto", "plain", "chat"], default="auto",
                        help="chat: each prompt a user turn in the chat template; auto: chat for the real model")
    parser.add_argument("--rounds", type=int, default=4, help="alternating runs per trainer")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="discarded steps per run")
    parser.add_argument("--memory", action="store_true", help="also compare peak RSS (one process per trainer)")
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument("--gemm-peak", help="read the GEMM peak from this bench/gemm_peak.py JSON (else measure it)")
    parser.add_argument("--gemm-sizes", default="512,1024,1536,2048",
                        help="square sizes of the in-process GEMM peak (plus the model's MLP shapes)")
    parser.add_argument("--gemm-repeats", type=int, default=5)
    parser.add_argument("--gemm-min-seconds", type=float, default=0.2)
    parser.add_argument("--child-memory", choices=sorted(RUNNERS), help=argparse_hidden())
    args = parser.parse_args()
    set_threads(args.threads)
    s = Settings(args.size, args.prompts, args.group_size, args.max_new_tokens, args.lr, args.attn, args.reward,
                 args.precision, lora=args.lora, prompt_format=args.prompt_format)
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, s, args.steps)))
        return
    results = []
    if not args.only_memory:
        results.append(throughput(s, args.rounds, args.steps, args.warmup, args))
    if args.memory or args.only_memory:
        results.append(memory(s, args.steps + args.warmup, args))
    for result in results:
        result.show()
    write_json(args.json, results)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
