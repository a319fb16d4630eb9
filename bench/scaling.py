"""How the cost of a GRPO iteration grows: time per iteration as G (samples per prompt), the response length and
the model size each double from a base setting, with the measured exponent (time ~ factor^k).

Uses the same trainer and timing as ``bench/grpo_vs_trl.py`` (this toolkit's side): iteration, generation and update
(iteration minus generation and reward), medians over ``--steps`` steps after ``--warmup``. Model size doubles by
doubling the layer count (4 -> 8 -> 16 layers of the ~13M-parameter model). An untrained model rarely emits EOS, so
responses run to nearly ``max_new_tokens``.

    python bench/scaling.py
    python bench/scaling.py --sizes tiny --group-sizes 2,4 --lengths 4,8 --steps 1 --warmup 1   # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, base_parser, median, set_threads, write_json
from bench.grpo_vs_trl import Settings, run_ours
from bench.rollout import exponent


def measure(s: Settings, steps: int, warmup: int) -> dict[str, float]:
    times = run_ours(s, warmup + steps)[warmup:]
    return {"iteration_s": median([t.iteration for t in times]), "generate_s": median([t.generate for t in times]),
            "update_s": median([t.update for t in times])}


def sweep(name: str, values: list[Any], make: Any, steps: int, warmup: int) -> dict[str, Any]:
    points = {}
    for value in values:
        points[str(value)] = measure(make(value), steps, warmup)
        print(f"  {name}={value}: iteration {points[str(value)]['iteration_s']:.3f}s", flush=True)
    factors = [float(2**i) for i in range(len(values))]
    out: dict[str, Any] = {"points": points}
    for part in ("iteration_s", "generate_s", "update_s"):
        out[f"exponent_{part[:-2]}"] = exponent(factors, [points[str(v)][part] for v in values])
    return out


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,small-8l,small-16l", help="model sizes, each double the last")
    parser.add_argument("--group-sizes", default="4,8,16")
    parser.add_argument("--lengths", default="16,32,64", help="max new tokens")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    sizes = args.sizes.split(",")
    groups = [int(g) for g in args.group_sizes.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    base = Settings(sizes[0], args.prompts, groups[0], lengths[0], 1e-5)
    figures = {
        "G": sweep("G", groups, lambda g: Settings(base.size, base.prompts_per_step, g, base.max_new_tokens, base.lr),
                   args.steps, args.warmup),
        "response_length": sweep("max_new_tokens", lengths, lambda n: Settings(base.size, base.prompts_per_step,
                                                                               base.group_size, n, base.lr),
                                 args.steps, args.warmup),
        "model_size": sweep("size", sizes, lambda m: Settings(m, base.prompts_per_step, base.group_size,
                                                              base.max_new_tokens, base.lr), args.steps, args.warmup),
    }
    result = Result("grpo_iteration_scaling", figures,
                    {"base": f"{base.size}, {base.prompts_per_step} prompts x G={base.group_size}, "
                             f"max_new_tokens={base.max_new_tokens}", "steps": args.steps, "warmup": args.warmup,
                     "note": "exponent k: time ~ (doubling factor)^k, least squares over the points"})
    result.show()
    write_json(args.json, [result])


if __name__ == "__main__":
    main()
