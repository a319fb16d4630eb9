"""Does a recipe learn on this machine, whatever the seed? Held-out accuracy before and after, per seed.

Float results differ between CPUs (an Intel Xeon with AMX and an AMD EPYC do not produce bit-identical SFT bases
or trajectories), so a learning claim is made over seeds, with the minimum and the mean, never one trajectory.

    python bench/learning_seeds.py recipes/quickstart.yaml --seeds 0 1 2 3 4 --json bench/results/quickstart_seeds.json
    python bench/learning_seeds.py recipes/lora_smollm2.yaml --seeds 0 1 -- rollout.engine=vllm

Every evaluation of each run is kept (``eval/accuracy`` at each ``logging.eval_every``), so the table also shows
how the gain grows with steps; runs go to a temporary directory unless ``--runs`` is given.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Result, base_parser, write_json


@dataclass
class SeedRun:
    seed: int
    before: float
    after: float
    curve: dict[int, float]  # step -> held-out accuracy at each evaluation
    seconds: float
    run_dir: str

    @property
    def gain(self) -> float:
        return self.after - self.before


def run_seed(recipe: str, seed: int, overrides: list[str], runs: Path) -> SeedRun:
    from align import api

    start = time.perf_counter()
    result = api.train(recipe, f"seed={seed}", f"logging.dir={runs}", "logging.tensorboard=false",
                       "logging.progress=false", *overrides, progress=False, log=lambda _: None)
    seconds = time.perf_counter() - start
    curve = {}
    for line in (result.run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/accuracy" in row:
            curve[int(row["step"])] = float(row["eval/accuracy"])
    return SeedRun(seed, result.metrics["eval/accuracy_before"], result.metrics["eval/accuracy_after"], curve,
                   round(seconds, 1), str(result.run_dir))


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--runs", help="keep the run directories here (default: a temporary directory)")
    args, rest = parser.parse_known_args()  # what is left: key=value recipe overrides, after --
    overrides = [a for a in rest if a != "--"]
    if any(a.startswith("-") or "=" not in a for a in overrides):
        parser.error(f"expected key=value recipe overrides after the options, got {overrides}")
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="align-seeds-"))
    rows = []
    for seed in args.seeds:
        row = run_seed(args.recipe, seed, overrides, runs)
        rows.append(row)
        curve = "  ".join(f"{step}:{100 * acc:.1f}" for step, acc in row.curve.items())
        print(f"seed {seed}: {100 * row.before:.1f}% -> {100 * row.after:.1f}% ({100 * row.gain:+.1f} points, "
              f"{row.seconds} s)   curve {curve}", flush=True)
    gains = [r.gain for r in rows]
    result = Result(name="learning_over_seeds",
                    figures={"min_gain": min(gains), "mean_gain": statistics.fmean(gains),
                             "max_gain": max(gains),
                             "per_seed": [{**asdict(r), "gain": r.gain} for r in rows]},
                    settings={"recipe": args.recipe, "overrides": overrides, "seeds": args.seeds})
    print(f"\ngain in points: min {100 * min(gains):+.1f}, mean {100 * statistics.fmean(gains):+.1f}, "
          f"max {100 * max(gains):+.1f} over seeds {args.seeds}")
    write_json(args.json, [result])


if __name__ == "__main__":
    main()
