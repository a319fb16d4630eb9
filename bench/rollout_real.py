"""Rollout on a real model (SmolLM2-135M-Instruct, fp32): transformers ``generate`` vs vLLM (the CPU build here)
through the toolkit's engines (``HFRolloutEngine``, ``ray_jobs.rollout_vllm.VLLMRolloutEngine``), as a GRPO step
sees them, and what a LoRA policy's weight sync costs under each ``rollout.engine_options.adapter_sync``.

The batch is GRPO-like: ``--prompts`` chat-templated prompts (an arithmetic question as a user turn, asking for the
working, so completions run long) x ``--samples`` samples each, at temperature 1, for each max new tokens in
``--lengths``. Per engine:

- ``load_s``: building the engine (transformers: loading the model; vLLM: its engine start, model load and KV cache);
- ``first_batch_s``: the first generate call after that (lazy initialisation included), at the first length
  (``vllm_native``: the first LoRA step's, at ``--lora-length``);
- ``t<L>``: steady state, median over ``--repeats`` calls after the first: generated tokens (up to and including
  EOS) per second of wall time, and the mean completion length.

LoRA (r 16, alpha 32 on q/k/v/o, peft; the policy's adapter is perturbed before every step, as an optimiser step
would, so every sync really changes the weights), at max new tokens ``--lora-length``, ``--lora-steps`` steps per
way after one discarded warm-up step. A step is what a user pays: weight sync, then generate. Ways:

- ``hf``: transformers samples from the peft model itself (sync is a version bump; the adapter runs unmerged);
- ``vllm_native`` (``adapter_sync: native``): the adapter is saved and every generate passes a ``LoRARequest``,
  vLLM applies it with its LoRA kernels (its engine is built with LoRA enabled);
- ``vllm_merge`` (``adapter_sync: merge``, as the engine now does it): merged weights of the adapted modules only,
  handed over in memory (the first sync of the model, timed apart as ``first_sync_s``, sends everything);
- ``vllm_merge_full``: every sync reloads all merged weights, in memory;
- ``vllm_merge_full_disk``: every sync writes all merged weights as safetensors and vLLM reads them back (how the
  engine synced before).

The three merge ways share one engine and alternate step by step, so drifting machine load hits them alike. Each
engine runs in its own process (a fresh interpreter: vLLM's in-process engine is built once per process).

    python bench/rollout_real.py --json runs/bench/rollout_real.json    # SmolLM2-135M; ~9 min on a busy 2-core box
    python bench/rollout_real.py --size tiny --lengths 8 --repeats 1 --lora-steps 1 --lora-length 8   # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REAL_MODELS,
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

PARTS = ("hf", "vllm", "vllm_native")  # one process each
LORA_R, LORA_ALPHA, LORA_TARGETS = 16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"]


def grpo_prompts(tokenizer: Any, count: int) -> list[str]:
    """``count`` arithmetic questions asking for the working, each as a user turn in the chat template with the
    assistant turn opened (plain text for a tokenizer without a template, the character-level test models)."""
    questions, _ = arithmetic_prompts(count, 0)
    texts = [f"Work out {q.rstrip('=')} step by step, then give the result." for q in questions]
    if not getattr(tokenizer, "chat_template", None):
        return questions
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


def timed_generate(engine: Any, prompts: list[str], samples: int, length: int, seed: int) -> tuple[float, float]:
    """One GRPO batch: (seconds, generated tokens up to and including EOS)."""
    from align.trainers.protocols import SamplingParams

    params = SamplingParams(max_new_tokens=length, temperature=1.0)
    start = time.perf_counter()
    rollout = engine.generate(prompts, {}, samples_per_prompt=samples, params=params, seed=seed)
    return time.perf_counter() - start, float(rollout.mask.sum())


def throughput(engine: Any, args: Any, prompts: list[str], table: dict[str, Any]) -> None:
    """First batch and steady-state tokens/s of ``engine`` at every length, into ``table``."""
    batch = len(prompts) * args.samples
    table["first_batch_s"], _ = timed_generate(engine, prompts, args.samples, args.lengths[0], seed=0)
    for length in args.lengths:
        runs = [timed_generate(engine, prompts, args.samples, length, seed=1 + i) for i in range(args.repeats)]
        table[f"t{length}"] = {"tokens_per_s": median([tokens / s for s, tokens in runs]),
                               "generate_s": median([s for s, _ in runs]),
                               "mean_len": median([tokens / batch for _, tokens in runs])}
        print(f"  {table['engine']} max_new_tokens {length}: {table[f't{length}']['tokens_per_s']:.0f} tokens/s "
              f"(mean length {table[f't{length}']['mean_len']:.1f})", flush=True)


def lora_policy(model: Any) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))


def train_step(policy: Any, step: int) -> None:
    """Stand-in for an optimiser step: move every adapter weight a little (lora_B starts at zero)."""
    import torch

    generator = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(1e-3 * torch.randn(p.shape, generator=generator))


def lora_steps(engine: Any, policy: Any, args: Any, prompts: list[str], ways: dict[str, Any]) -> dict[str, Any]:
    """Per way: median sync, generate and step (sync + generate) seconds and generated tokens/s over the measured
    steps, and the discarded first step's sync and generate seconds; ``ways`` maps a name to its sync call
    ``sync(policy, version)``. Ways alternate step by step."""
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
    version = 1
    for step in range(args.lora_steps + 1):
        order = list(ways) if step % 2 == 0 else list(reversed(ways))
        for name in order:
            train_step(policy, version)
            start = time.perf_counter()
            ways[name](policy, version)
            sync_s = time.perf_counter() - start
            generate_s, tokens = timed_generate(engine, prompts, args.samples, args.lora_length, seed=version)
            version += 1
            rows[name].append((sync_s, generate_s, tokens))
    out = {}
    for name, (first, *measured) in rows.items():
        out[name] = {"sync_s": median([r[0] for r in measured]), "generate_s": median([r[1] for r in measured]),
                     "step_s": median([r[0] + r[1] for r in measured]),
                     "tokens_per_s": median([r[2] / r[1] for r in measured]), "steps": len(measured),
                     "warmup_sync_s": first[0], "warmup_generate_s": first[1]}
        print(f"  {name} LoRA step: sync {out[name]['sync_s']:.3f} s + generate {out[name]['generate_s']:.2f} s "
              f"= {out[name]['step_s']:.2f} s ({out[name]['tokens_per_s']:.0f} tokens/s)", flush=True)
    return out


def run_part(part: str, args: Any) -> dict[str, Any]:
    """One engine's figures, measured in this process."""
    import torch

    start = time.perf_counter()
    model, tokenizer = load_model(args.size)
    model.eval()
    model_load_s = time.perf_counter() - start
    prompts = grpo_prompts(tokenizer, args.prompts)
    table: dict[str, Any] = {"engine": part, "model_load_s": model_load_s}
    if part == "hf":
        from align.trainers.rollout_hf import HFRolloutEngine

        start = time.perf_counter()
        engine: Any = HFRolloutEngine(model, tokenizer, batch_size=4096)
        table["load_s"] = model_load_s + time.perf_counter() - start  # the engine is the model
        throughput(engine, args, prompts, table)
        if args.lora_steps:
            policy = lora_policy(model)
            engine.sync_weights(policy, 0)
            table["lora"] = lora_steps(engine, policy, args, prompts, {"hf": engine.sync_weights})
    else:
        from ray_jobs.rollout_vllm import VLLMRolloutEngine, _policy_state

        native = part == "vllm_native"
        start = time.perf_counter()
        engine = VLLMRolloutEngine(model_path(args.size), tokenizer, dtype="float32", kv_cache_bytes=2**30,
                                   max_model_len=1024, lora_rank=LORA_R if native else None)
        table["load_s"] = time.perf_counter() - start
        if native:
            # no throughput runs: the base model is the other part's; this engine is measured in the LoRA steps
            policy = lora_policy(model)
            engine.sync_weights(policy, 0)
            table["lora"] = lora_steps(engine, policy, args, prompts, {"vllm_native": engine.sync_weights})
            table["first_batch_s"] = table["lora"]["vllm_native"]["warmup_generate_s"]  # the engine's first call
        else:
            throughput(engine, args, prompts, table)
        if not native and args.lora_steps:
            policy = lora_policy(model)
            start = time.perf_counter()
            engine.sync_weights(policy, 0)
            table["first_sync_s"] = time.perf_counter() - start

            # the full ways reload below sync_weights: the engine still knows the policy, so the next merge sync
            # stays partial (a reload of the same weights leaves what it vouches for true)
            def full(p: Any, version: int) -> None:
                engine._reload(_policy_state(p), partial=False)
                engine.weight_version = version

            def full_disk(p: Any, version: int) -> None:
                engine._reload(_policy_state(p), partial=False, via_disk=True)
                engine.weight_version = version

            def merge(p: Any, version: int) -> None:
                if engine._synced is None or not engine._in_process:
                    raise RuntimeError("vllm_merge: the engine would send every weight, not the adapted modules")
                engine.sync_weights(p, version)

            table["lora"] = lora_steps(engine, policy, args, prompts, {
                "vllm_merge": merge, "vllm_merge_full": full, "vllm_merge_full_disk": full_disk})
        engine.close()
    table["torch_threads"] = torch.get_num_threads()
    return table


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--size", default="smollm2", help="smollm2 (the real model) or a bench size (tiny, small)")
    parser.add_argument("--engines", default="hf,vllm,vllm_native", help=f"any of {', '.join(PARTS)}")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per GRPO batch")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--lengths", default="48,128", help="max new tokens of the throughput runs")
    parser.add_argument("--repeats", type=int, default=2, help="steady-state calls per length (median)")
    parser.add_argument("--lora-length", type=int, default=48, help="max new tokens of the LoRA steps")
    parser.add_argument("--lora-steps", type=int, default=2,
                        help="measured LoRA steps per way (median); 0: no LoRA runs (vllm_native still runs one)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: one engine, in this process
    parser.add_argument("--part-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    set_threads(args.threads)
    if args.part:
        Path(args.part_json).write_text(json.dumps(run_part(args.part, args)))
        return
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.engines.split(","):
            if part not in PARTS:
                raise SystemExit(f"unknown engine {part!r}; choose from {', '.join(PARTS)}")
            out = Path(tmp) / f"{part}.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--part", part, "--part-json", str(out)]
            print(f"{part}:", flush=True)
            figures[part] = run_child(_without_json(cmd), out)
    figures.update(summary(figures, args))
    result = Result("rollout_real_model", figures, {
        "model": describe_model(args.size), "versions": versions(), "dtype": "float32", "temperature": 1.0,
        "batch": f"{args.prompts} prompts x {args.samples} samples"
                 + (", chat template" if args.size in REAL_MODELS else ""),
        "repeats": args.repeats, "lora": f"r {LORA_R}, alpha {LORA_ALPHA}, {'/'.join(t[0] for t in LORA_TARGETS)}",
        "lora_length": args.lora_length, "lora_steps": args.lora_steps,
        "note": "step_s = sync + generate, medians over the measured steps; tokens/s = generated tokens / generate s"})
    result.show()
    write_json(args.json, [result])


def summary(figures: dict[str, Any], args: Any) -> dict[str, Any]:
    """The comparisons a default is chosen by: vLLM over transformers tokens/s per length, and every LoRA way's step
    time over the fastest way's."""
    out: dict[str, Any] = {}
    if "hf" in figures and "vllm" in figures:
        out["ratio_vllm_over_hf"] = {f"t{n}": figures["vllm"][f"t{n}"]["tokens_per_s"]
                                     / figures["hf"][f"t{n}"]["tokens_per_s"] for n in args.lengths}
    steps = {name: way["step_s"] for part in figures.values() for name, way in part.get("lora", {}).items()}
    if steps:
        best = min(steps, key=lambda name: steps[name])
        out["lora_step_over_fastest"] = {name: s / steps[best] for name, s in sorted(steps.items(), key=lambda x: x[1])}
        out["lora_fastest"] = best
    return out


def run_child(cmd: list[str], out: Path) -> dict[str, Any]:
    """Run one part in a fresh interpreter, echoing its figure lines (vLLM's log lines stay in its stderr and show
    only on failure); its figures, from ``out``."""
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("  "):
                print(line, end="", flush=True)
        if child.wait() != 0:
            err.seek(0)
            part = cmd[cmd.index("--part") + 1]
            raise SystemExit(f"the {part} run failed (exit {child.returncode}): {err.read()[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _without_json(cmd: list[str]) -> list[str]:
    """The command minus ``--json PATH`` (a part writes only its own file)."""
    out, skip = [], False
    for c in cmd:
        if skip:
            skip = False
        elif c == "--json":
            skip = True
        elif not c.startswith("--json="):
            out.append(c)
    return out


if __name__ == "__main__":
    main()
