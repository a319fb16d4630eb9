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

    python bench/grpo_vs_trl.py                       # the figures in docs/benchmarks.md
    python bench/grpo_vs_trl.py --size tiny --rounds 1 --steps 2 --warmup 1 --max-new-tokens 8   # smoke test
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
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


@dataclass
class Settings:
    size: str
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    lr: float
    attn: str = "sdpa"  # transformers attention kernel, the same for both sides
    reward: str = "shaped"  # "shaped" (dense) or "exact" (binary), the same plain function for both sides
    precision: str = "no"  # "bf16": bf16 autocast on both sides (TRL's bf16=True, our learner.mixed_precision)
    seed: int = 0

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class StepTime:
    iteration: float
    generate: float
    reward: float
    skipped_rows: float = 0.0  # ours: the share of rows whose group was inert (all advantages exactly 0)

    @property
    def update(self) -> float:
        return self.iteration - self.generate - self.reward


def _common_setup(s: Settings) -> tuple[Any, Any, list[str], list[str], Stopwatch, Stopwatch]:
    """What both sides start from: the seeded model and tokenizer, the prompts, and the two stopwatches, the
    generation one already wrapped around ``model.generate``."""
    import torch

    torch.manual_seed(s.seed)
    model, tokenizer = load_model(s.size, s.attn)
    prompts, answers = arithmetic_prompts(256, s.seed)
    gen_clock, reward_clock = Stopwatch(), Stopwatch()
    model.generate = gen_clock.wrap(model.generate)
    return model, tokenizer, prompts, answers, gen_clock, reward_clock


# -- this toolkit ------------------------------------------------------------------------------------------------
def run_ours(s: Settings, steps: int, on_ready: Any = None) -> list[StepTime]:
    """The local runtime's step, driven without a recipe: :class:`PolicyWorkload` (sampler, HF engine, reward,
    advantages) feeds :class:`PolicyLearner` (torch strategy), then the weight sync (a version bump)."""
    import torch

    from align.algorithms import PRESETS
    from align.trainers.learner import InProcessLearner, PolicyLearner
    from align.trainers.optim import build_optimizer, build_scheduler
    from align.trainers.protocols import RewardResult, Rollout, SamplingParams
    from align.trainers.rollout_hf import HFRolloutEngine
    from align.trainers.sampler import PromptSampler
    from align.trainers.strategy import TorchStrategy
    from align.trainers.workload import PolicyWorkload

    model, tokenizer, prompts, answers, gen_clock, reward_clock = _common_setup(s)

    def score(rollout: Rollout, step: int) -> RewardResult:
        values = torch.tensor(REWARDS[s.reward](rollout.completions, rollout.columns["answer"]), dtype=torch.float64)
        return RewardResult(rewards=values, valid=torch.ones(len(values), dtype=torch.bool),
                            per_reward={"shaped": values}, metrics={})

    spec = replace(PRESETS.get("grpo"), kl=None, kl_coef=0.0)  # TRL's beta=0, loss_type="grpo"
    optimizer = build_optimizer(model, lr=s.lr, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=steps)
    learner = InProcessLearner(PolicyLearner(spec, TorchStrategy(model, optimizer, scheduler, max_grad_norm=1.0),
                                             reference=None, temperature=1.0, micro_batch_size=s.batch,
                                             updates_per_batch=1, precision=s.precision))
    engine = HFRolloutEngine(model, tokenizer, precision=s.precision)  # samples under the learner's autocast
    workload = PolicyWorkload(spec=spec, engine=engine, rewards=reward_clock.wrap(score), learner=learner,
                              prompts=prompts, columns={"answer": answers},
                              sampler=PromptSampler(len(prompts), s.seed), prompts_per_step=s.prompts_per_step,
                              samples_per_prompt=s.group_size,
                              sampling=SamplingParams(max_new_tokens=s.max_new_tokens, temperature=1.0))
    if on_ready is not None:
        on_ready()
    times = []
    version = 0
    last = time.perf_counter()
    for step in range(1, steps + 1):
        collected = workload.collect(step, version, prefetch=step != steps)
        metrics = dict(collected.metrics)
        if collected.batch is not None:
            metrics.update(learner.step(collected.batch))
            version += 1
            engine.sync_weights(model, version)
        now = time.perf_counter()
        times.append(StepTime(now - last, gen_clock.take(), reward_clock.take(),
                              metrics.get("update/skipped_rows_frac", 0.0)))
        last = now
    return times


# -- TRL ---------------------------------------------------------------------------------------------------------
def run_trl(s: Settings, steps: int, on_ready: Any = None) -> list[StepTime]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer, prompts, answers, gen_clock, reward_clock = _common_setup(s)

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return REWARDS[s.reward](completions, answer)

    times: list[StepTime] = []
    clock = step_end_clock(lambda seconds: times.append(StepTime(seconds, gen_clock.take(), reward_clock.take())),
                           on_begin=on_ready)

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
        trainer = GRPOTrainer(model=model, reward_funcs=reward_clock.wrap(reward), args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts, "answer": answers}),
                              processing_class=tokenizer, callbacks=[clock])
        trainer.train()
    return times


RUNNERS = {"ours": run_ours, "trl": run_trl}
REWARDS = {"shaped": shaped_reward, "exact": exact_reward}


# -- throughput ----------------------------------------------------------------------------------------------------
def throughput(s: Settings, rounds: int, steps: int, warmup: int) -> Result:
    measured = interleave(lambda name: RUNNERS[name](s, warmup + steps), rounds, warmup,
                          lambda kept: f"iteration {median([t.iteration for t in kept]):.3f}s")
    figures: dict[str, Any] = {}
    for name, times in measured.items():
        it = [t.iteration for t in times]
        up = [t.update for t in times]
        figures[name] = {
            "iteration_s": median(it), "iteration_iqr": iqr(it), "generate_s": median([t.generate for t in times]),
            "reward_s": median([t.reward for t in times]), "update_s": median(up), "update_iqr": iqr(up),
            "completions_per_s": s.batch / median(it), "update_completions_per_s": s.batch / median(up),
            "steps_measured": len(times),
        }
        if name == "ours":
            figures[name]["skipped_rows_frac"] = sum(t.skipped_rows for t in times) / max(len(times), 1)
    figures["ratio_iteration"] = figures["ours"]["completions_per_s"] / figures["trl"]["completions_per_s"]
    figures["ratio_update"] = figures["ours"]["update_completions_per_s"] / figures["trl"]["update_completions_per_s"]
    return Result("grpo_throughput_vs_trl", figures, _settings(s, rounds=rounds, steps=steps, warmup=warmup))


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
               "--precision", s.precision, "--attn", s.attn, "--reward", s.reward]
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
            "torch_threads": torch.get_num_threads(),
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
    parser.add_argument("--rounds", type=int, default=4, help="alternating runs per trainer")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="discarded steps per run")
    parser.add_argument("--memory", action="store_true", help="also compare peak RSS (one process per trainer)")
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument("--child-memory", choices=sorted(RUNNERS), help=argparse_hidden())
    args = parser.parse_args()
    set_threads(args.threads)
    s = Settings(args.size, args.prompts, args.group_size, args.max_new_tokens, args.lr, args.attn, args.reward,
                 args.precision)
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, s, args.steps)))
        return
    results = []
    if not args.only_memory:
        results.append(throughput(s, args.rounds, args.steps, args.warmup))
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
