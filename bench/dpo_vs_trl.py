"""DPO step throughput, this toolkit's PreferenceLearner vs TRL's DPOTrainer, side by side.

Both get the same offline model (loaded from the same files), the same pairs in the same order of difficulty (a
prompt and two responses of ``--response-chars`` characters), the same batch of pairs per step, the sigmoid DPO loss
with beta=0.1 against a frozen reference copy, fused AdamW with the same learning rate, clipping and constant schedule,
fp32 or (``--precision bf16``) bf16 autocast on both sides. TRL gets its fastest settings: gradient checkpointing off,
reference log-probs computed in the step as ours (precomputing them moves the same work before training), no
logging, evaluation or saving inside the timed steps.

An iteration is the wall time between the ends of two consecutive optimiser steps; the first ``--warmup`` steps of
each run are discarded, runs alternate between the trainers and the figures are medians over all measured steps.

    python bench/dpo_vs_trl.py
    python bench/dpo_vs_trl.py --size tiny --rounds 1 --steps 2 --warmup 1 --response-chars 8   # smoke test
"""

from __future__ import annotations

import copy
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Result,
    arithmetic_prompts,
    base_parser,
    describe_model,
    interleave,
    iqr,
    load_model,
    median,
    set_threads,
    step_end_clock,
    versions,
    write_json,
)


@dataclass
class Settings:
    size: str
    pairs_per_step: int
    response_chars: int
    lr: float
    attn: str = "sdpa"  # transformers attention kernel, the same for both sides
    precision: str = "no"  # "bf16": bf16 autocast on both sides
    seed: int = 0


def make_pairs(s: Settings, count: int) -> dict[str, list[str]]:
    """Prompts from the arithmetic task; chosen and rejected responses of digits and spaces, seeded."""
    prompts, answers = arithmetic_prompts(count, s.seed)
    rng = random.Random(s.seed)

    def filler(start: str) -> str:
        body = "".join(rng.choice("0123456789 +=") for _ in range(max(0, s.response_chars - len(start) - 1)))
        return f"{start} {body}"[: s.response_chars]

    return {"prompt": prompts, "chosen": [filler(a) for a in answers],
            "rejected": [filler(str(int(a) + 1)) for a in answers]}


def run_ours(s: Settings, steps: int) -> list[float]:
    """The local runtime's preference step without a recipe: pairs tokenised in the step, then one
    :class:`PreferenceLearner` step (torch strategy, frozen reference copy)."""
    import torch

    from align.algorithms import PRESETS
    from align.trainers.learner import InProcessLearner, PreferenceLearner
    from align.trainers.optim import build_optimizer, build_scheduler
    from align.trainers.preference import tokenize_pairs
    from align.trainers.strategy import Reference, TorchStrategy

    torch.manual_seed(s.seed)
    model, tokenizer = load_model(s.size, s.attn)
    spec = PRESETS.get("dpo")
    optimizer = build_optimizer(model, lr=s.lr, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=steps)
    learner = InProcessLearner(PreferenceLearner(spec, TorchStrategy(model, optimizer, scheduler, max_grad_norm=1.0),
                                                 Reference(model, lora=False), micro_batch_size=s.pairs_per_step,
                                                 precision=s.precision))
    data = make_pairs(s, s.pairs_per_step * steps)
    times = []
    last = time.perf_counter()
    for step in range(steps):
        rows = slice(step * s.pairs_per_step, (step + 1) * s.pairs_per_step)
        learner.step(tokenize_pairs(tokenizer, data["prompt"][rows], data["chosen"][rows], data["rejected"][rows]))
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def run_trl(s: Settings, steps: int) -> list[float]:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(s.seed)
    model, tokenizer = load_model(s.size, s.attn)
    data = make_pairs(s, s.pairs_per_step * steps)
    times: list[float] = []

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=s.pairs_per_step,
            gradient_accumulation_steps=1, learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, optim="adamw_torch_fused", max_grad_norm=1.0, beta=0.1,
            loss_type=["sigmoid"], gradient_checkpointing=False, bf16=s.precision == "bf16", fp16=False,
            use_cpu=True,
            logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, seed=s.seed,
            dataloader_num_workers=0, max_length=None, precompute_ref_log_probs=False,
        )
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=Dataset.from_dict(data), processing_class=tokenizer,
                             callbacks=[step_end_clock(times.append)])
        trainer.train()
    return times


RUNNERS = {"ours": run_ours, "trl": run_trl}


def throughput(s: Settings, rounds: int, steps: int, warmup: int) -> Result:
    measured = interleave(lambda name: RUNNERS[name](s, warmup + steps), rounds, warmup,
                          lambda kept: f"step {median(kept):.3f}s")
    figures: dict[str, Any] = {}
    for name, times in measured.items():
        figures[name] = {"step_s": median(times), "step_iqr": iqr(times),
                         "pairs_per_s": s.pairs_per_step / median(times), "steps_measured": len(times)}
    figures["ratio"] = figures["ours"]["pairs_per_s"] / figures["trl"]["pairs_per_s"]
    import torch

    settings = {"model": describe_model(s.size), "pairs_per_step": s.pairs_per_step,
                "response_chars": s.response_chars, "lr": s.lr, "beta": 0.1, "precision": s.precision,
                "attention": s.attn, "torch_threads": torch.get_num_threads(), "rounds": rounds, "steps": steps,
                "warmup": warmup, "versions": versions()}
    return Result("dpo_throughput_vs_trl", figures, settings)


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per optimiser step")
    parser.add_argument("--response-chars", type=int, default=48, help="length of each chosen/rejected response")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no", help="bf16: bf16 autocast, both sides")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel (both sides)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    result = throughput(Settings(args.size, args.pairs, args.response_chars, args.lr, args.attn, args.precision),
                        args.rounds, args.steps, args.warmup)
    result.show()
    write_json(args.json, [result])


if __name__ == "__main__":
    main()
