"""Rollout throughput: vLLM (the CPU build here) vs transformers ``generate``, on the same model, as batch size and
response length grow.

Both run through the toolkit's rollout engines (``HFRolloutEngine``, ``ray_jobs.rollout_vllm.VLLMRolloutEngine``),
so both return the same thing: sampled tokens with their log-probs at temperature 1. Throughput is generated tokens
(up to and including EOS) per second of wall time, median of ``--repeats`` calls after one warm-up call per setting.
vLLM's engine start (model load, KV-cache allocation) is reported separately.

    python bench/rollout.py                                        # batches 8,32,128 x lengths 32,128
    python bench/rollout.py --size tiny --batches 4 --lengths 8 --repeats 1 --engines hf   # smoke test
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Result,
    arithmetic_prompts,
    base_parser,
    describe_model,
    load_model,
    median,
    model_path,
    set_threads,
    versions,
    write_json,
)


def tokens_per_second(engine: Any, prompts: list[str], length: int, repeats: int) -> tuple[float, float]:
    from align.trainers.protocols import SamplingParams

    params = SamplingParams(max_new_tokens=length, temperature=1.0)
    engine.generate(prompts[:2], {}, samples_per_prompt=1, params=params)  # warm-up
    rates, lengths = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        rollout = engine.generate(prompts, {}, samples_per_prompt=1, params=params)
        elapsed = time.perf_counter() - start
        tokens = float(rollout.mask.sum())
        rates.append(tokens / elapsed)
        lengths.append(tokens / len(prompts))
    return median(rates), median(lengths)


def build(name: str, size: str) -> tuple[Any, float]:
    start = time.perf_counter()
    model, tokenizer = load_model(size)
    if name == "hf":
        from align.trainers.rollout_hf import HFRolloutEngine

        engine: Any = HFRolloutEngine(model.eval(), tokenizer, batch_size=4096)
    else:
        from ray_jobs.rollout_vllm import VLLMRolloutEngine

        engine = VLLMRolloutEngine(model_path(size), tokenizer, dtype="float32", kv_cache_bytes=2 * 2**30,
                                   max_model_len=1024)
    return engine, time.perf_counter() - start


def exponent(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else float("nan")


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--batches", default="8,32,128", help="completions per generate call")
    parser.add_argument("--lengths", default="32,128", help="max new tokens")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    prompts, _ = arithmetic_prompts(max(batches), 0)
    figures: dict[str, Any] = {}
    for name in args.engines.split(","):
        engine, startup = build(name, args.size)
        table: dict[str, Any] = {"startup_s": startup}
        for length in lengths:
            for batch in batches:
                rate, mean_len = tokens_per_second(engine, prompts[:batch], length, args.repeats)
                table[f"b{batch}_t{length}"] = {"tokens_per_s": rate, "mean_len": mean_len}
                print(f"  {name} batch {batch} max_new_tokens {length}: {rate:.0f} tokens/s "
                      f"(mean length {mean_len:.1f})", flush=True)
            rates = [table[f"b{b}_t{length}"]["tokens_per_s"] for b in batches]
            if len(batches) > 1:
                table[f"batch_exponent_t{length}"] = exponent([float(b) for b in batches], rates)
        figures[name] = table
        if hasattr(engine, "close"):
            engine.close()
    if "hf" in figures and "vllm" in figures:
        figures["ratio_vllm_over_hf"] = {key: figures["vllm"][key]["tokens_per_s"] / figures["hf"][key]["tokens_per_s"]
                                         for key, value in figures["hf"].items() if isinstance(value, dict)}
    result = Result("rollout_throughput", figures,
                    {"model": describe_model(args.size), "versions": versions(),
                     "dtype": "float32", "temperature": 1.0, "repeats": args.repeats,
                     "note": "batch_exponent: slope of log(tokens/s) vs log(batch); 1 = perfect batching"})
    result.show()
    write_json(args.json, [result])


if __name__ == "__main__":
    main()
