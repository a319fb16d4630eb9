"""Ray runtime overhead: the share of a Ray iteration not spent in generation, the update or reward compute.

Runs a recipe on the Ray runtime (default: ``recipes/quickstart_ray.yaml``: a vLLM rollout worker, two DeepSpeed
learner ranks over gloo, two reward workers) and reads the per-step timings the driver logs. The work is measured
where it happens: generation inside the rollout worker, reward compute inside the slowest reward worker, the update
(forward, backward, all-reduce, optimiser step) inside the slowest learner rank. Everything else in ``time/step`` is
overhead: Ray dispatch and object transfer, serialisation, the driver's advantage estimation, and the weight sync to
the rollout worker (also reported alone). Evaluation, the weight-sync probe and checkpoints run between steps and are
not part of ``time/step``. The first ``--warmup`` steps are discarded; figures are medians over the rest.

    python bench/ray_overhead.py
    python bench/ray_overhead.py --steps 3 --warmup 1 --set rollout.engine=hf --set runtime.learners=1   # smoke test
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, base_parser, median, write_json

PARTS = ("generate", "reward_compute", "learner_compute", "weight_sync", "overhead")


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parent.parent / "recipes/quickstart_ray.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe overrides")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    from align.api import train

    with tempfile.TemporaryDirectory() as logs:
        overrides = [f"learner.steps={args.steps}", f"logging.eval_every={10**6}", f"checkpoint.every={10**6}",
                     f"logging.dir={logs}", *args.set]
        result = train(args.recipe, *overrides, progress=False, log=lambda line: None)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step", 0) > args.warmup and "time/step" in r]
    if not steps:
        raise SystemExit("no timed steps were logged (did every step drop its batch?)")
    figures: dict[str, Any] = {"step_s": median([r["time/step"] for r in steps])}
    for part in PARTS:
        figures[f"{part}_s"] = median([r[f"time/{part}"] for r in steps])
    figures["overhead_frac"] = median([r["time/overhead_frac"] for r in steps])
    figures["weight_sync_frac"] = median([r["time/weight_sync"] / r["time/step"] for r in steps])
    figures["steps_measured"] = len(steps)
    recipe_name = Path(args.recipe).name
    result_obj = Result("ray_overhead", figures, {"recipe": recipe_name, "overrides": " ".join(args.set) or "none",
                                                  "steps": args.steps, "warmup": args.warmup})
    result_obj.show()
    write_json(args.json, [result_obj])


if __name__ == "__main__":
    main()
