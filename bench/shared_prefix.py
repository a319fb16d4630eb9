"""Forward + backward of the policy over GRPO groups: every row's prompt recomputed (``response_outputs``) vs each
prompt computed once and its KV cache shared by the group (``shared_prefix_outputs``).

SmolLM2-135M-Instruct (the named offline model, converted once into ``$ALIGN_CACHE``), fp32, one thread by default,
as a LoRA adapter (r16 on q,k,v,o) and as a full fine-tune. Each batch holds ``--rows`` rows: ``rows / G`` groups
of G completions of ``--answer-tokens`` tokens each, behind chat-templated GSM8K-style prompts (system + question,
about 60-120 tokens, left-padded to the longest in the batch). One measurement is zero_grad + forward + a weighted
log-prob loss + backward. The variants run interleaved (the order flips every repeat, so drifting load hits both);
the table gives medians with the interquartile range and the median of the per-repeat speedups.

    python bench/shared_prefix.py --out /tmp/shared_prefix.json              # ~5 minutes on 1 core
    python bench/shared_prefix.py --repeats 1 --modes lora --group-sizes 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import iqr, machine, median

SYSTEM = ("You are a careful math tutor. Solve the problem step by step, then give the final answer as a number in "
          "\\boxed{}.")
QUESTIONS = [  # GSM8K-style word problems written for this benchmark; templated they are ~60-120 tokens
    "Ava has 3 boxes of pencils with 12 pencils in each box. She gives 9 pencils to her brother. How many pencils "
    "does she have left?",
    "A bakery sells muffins for $3 each and cookies for $2 each. On Monday it sold 45 muffins and twice as many "
    "cookies as muffins. On Tuesday it sold 10 fewer muffins than on Monday and the same number of cookies. How much "
    "money did the bakery make over the two days?",
    "Liam reads 24 pages a day. His book has 360 pages. After 5 days he speeds up and reads 36 pages a day. How "
    "many days does it take him to finish the book in total?",
    "A farmer has 120 apples. He sells a quarter of them at the market in the morning, gives 15 to his neighbours, "
    "and uses a third of what is left to bake pies. Each pie needs 5 apples. How many pies can he bake, and how "
    "many apples are left over after baking?",
]
SOLUTION = ("First, find the number of items in each part of the problem. Multiply the number of boxes by the "
            "number in each box, then subtract what was given away. Next, add the amounts from each day and multiply "
            "by the price. Check the arithmetic once more before writing the result. So the final answer is "
            "\\boxed{27}. This matches the information given in the question, and every step uses whole numbers.")


def build_batch(tokenizer: Any, group_size: int, rows: int, answer_tokens: int) -> dict[str, Any]:
    import torch

    from align.trainers.sequences import encode, pad_left, pad_right

    groups = max(1, rows // group_size)
    # one group takes the 91-token prompt (the middle of the range); several cycle from the 76- and 108-token ones
    order = [2] if groups == 1 else [(0, 1, 3, 2)[g % 4] for g in range(groups)]
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": QUESTIONS[i]}],
                                           tokenize=False, add_generation_prompt=True) for i in order]
    prompts = [ids for ids in encode(tokenizer, texts) for _ in range(group_size)]
    solution = encode(tokenizer, [SOLUTION])[0]
    if len(solution) < answer_tokens + len(prompts):
        raise SystemExit(f"the solution text has {len(solution)} tokens; --answer-tokens must be at most "
                         f"{len(solution) - len(prompts)}")
    answers = [solution[i : i + answer_tokens] for i in range(len(prompts))]  # distinct rows of equal length
    prompt_ids, prompt_mask = pad_left(prompts, tokenizer.pad_token_id)
    completion_ids, mask = pad_right(answers, tokenizer.pad_token_id)
    weights = torch.linspace(-1.0, 1.0, mask.numel()).reshape(mask.shape) * mask
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, mask=mask,
                weights=weights, prompt_lengths=sorted({len(p) for p in prompts}))


def step(fn: Any, model: Any, batch: dict[str, Any]) -> tuple[float, Any]:
    """Seconds of zero_grad + forward + loss + backward, and the detached log-probs."""
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    out = fn(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["mask"])
    (out.logp * batch["weights"]).sum().backward()
    return time.perf_counter() - start, out.logp.detach()


def load(path: Path, mode: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # eval: the learner's mode
    if mode == "full":
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the figures to this JSON file")
    parser.add_argument("--repeats", type=int, default=4, help="timed runs of each variant (after a small warm-up)")
    parser.add_argument("--group-sizes", default="4,8", help="G values, comma-separated")
    parser.add_argument("--modes", default="lora,full", help="lora and/or full")
    parser.add_argument("--rows", type=int, default=8, help="rows per batch (rows / G groups)")
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from align.models.named import prepare_named_model
    from align.trainers.sequences import response_outputs
    from align.trainers.shared_prefix import shared_prefix_outputs

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    root = Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align")
    path = prepare_named_model("smollm2-135m-instruct", root)
    tokenizer = AutoTokenizer.from_pretrained(path)
    sides = {"unshared": response_outputs, "shared": shared_prefix_outputs}
    sizes = [int(g) for g in args.group_sizes.split(",")]
    info = machine()
    print(f"CPU: {info['cpu']} ({info['cores']} cores), torch threads {torch.get_num_threads()}, torch "
          f"{info['torch']}; SmolLM2-135M-Instruct fp32, {args.rows} rows x {args.answer_tokens} answer tokens",
          flush=True)

    results = []
    for mode in args.modes.split(","):
        model = load(path, mode)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        batches = {g: build_batch(tokenizer, g, args.rows, args.answer_tokens) for g in sizes}
        times: dict[tuple[int, str], list[float]] = {(g, s): [] for g in sizes for s in sides}
        warm = {k: v[:2, :8] if k in ("completion_ids", "mask", "weights") else v[:2]
                for k, v in batches[sizes[0]].items() if k != "prompt_lengths"}
        for fn in sides.values():  # warm-up on a small batch: kernels and allocator paged in
            step(fn, model, warm)
        logps: dict[tuple[int, str], Any] = {}
        for r in range(args.repeats):
            for g, batch in batches.items():
                for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    seconds, logps[(g, name)] = step(sides[name], model, batch)
                    times[(g, name)].append(seconds)
            print(f"  {mode} repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"G={g} {n} {times[(g, n)][-1]:.2f}s" for g in sizes for n in sides), flush=True)
        for g, batch in batches.items():
            un, sh = times[(g, "unshared")], times[(g, "shared")]
            ratios = [a / b for a, b in zip(un, sh, strict=True)]
            results.append({
                "mode": mode, "trainable_parameters": trainable, "G": g, "rows": args.rows,
                "groups": max(1, args.rows // g), "prompt_tokens": batch["prompt_lengths"],
                "prompt_columns": int(batch["prompt_ids"].shape[1]), "answer_tokens": args.answer_tokens,
                "unshared_s": un, "shared_s": sh, "unshared_median_s": median(un), "unshared_iqr_s": iqr(un),
                "shared_median_s": median(sh), "shared_iqr_s": iqr(sh), "speedup_median": median(ratios),
                "speedup_of_medians": median(un) / median(sh),
                "max_abs_logp_gap": float((logps[(g, "unshared")] - logps[(g, "shared")]).abs().max())})
        del model

    print(f"\nforward+backward seconds per batch, median [IQR] of {args.repeats}; CPU: {info['cpu']}, "
          f"{torch.get_num_threads()} thread(s)")
    header = (f"{'mode':<5} {'G':>2} {'prompt tok':>11} {'unshared s':>20} {'shared s':>20} {'speedup':>8} "
              f"{'logp gap':>9}")
    print(header + "\n" + "-" * len(header))
    for x in results:
        lo, hi = x["unshared_iqr_s"]
        slo, shi = x["shared_iqr_s"]
        lengths = "/".join(str(n) for n in x["prompt_tokens"])
        print(f"{x['mode']:<5} {x['G']:>2} {lengths:>11} {x['unshared_median_s']:>6.2f} [{lo:.2f}-{hi:.2f}]"
              f"{'':>3} {x['shared_median_s']:>6.2f} [{slo:.2f}-{shi:.2f}]{'':>3} {x['speedup_median']:>7.2f}x "
              f"{x['max_abs_logp_gap']:>9.1e}")
    if args.out:
        payload = {"benchmark": "shared_prefix", "machine": info, "date": time.strftime("%Y-%m-%d %H:%M"),
                   "model": "smollm2-135m-instruct (fp32)", "settings": vars(args), "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
