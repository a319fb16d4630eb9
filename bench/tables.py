"""Render the figures in docs/bench-results/*.json as the Markdown tables of docs/benchmarks.md.

Replaces the text between ``<!-- figures:begin -->`` and ``<!-- figures:end -->`` in docs/benchmarks.md, so the
document always shows exactly what the last ``bench/run_all.sh`` measured.

    python bench/tables.py            # rewrite docs/benchmarks.md in place
    python bench/tables.py --print    # print the tables only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "bench-results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def first(payload: dict[str, Any] | None, result: str) -> dict[str, Any] | None:
    if payload is None:
        return None
    return next((r for r in payload["results"] if r["name"] == result), None)


def runs(result: str, files: tuple[tuple[str, str], ...]) -> list[tuple[str, dict[str, Any]]]:
    """(label, figures) of ``result`` in each (file name, label) that has been measured."""
    found = [(label, first(load(name), result)) for name, label in files]
    return [(label, r["figures"]) for label, r in found if r is not None]


def verdict(value: float, goal: float, higher_is_better: bool = True) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return f"{'met' if ok else 'missed'} (goal {'>=' if higher_is_better else '<='} {goal:g}x)"


def grpo_rows() -> list[str]:
    rows = ["| setting | ours iteration (s) | TRL iteration (s) | ours generate / update (s) | "
            "TRL generate / update (s) | completions/s ours / TRL | iteration ratio | update ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for label, f in runs("grpo_throughput_vs_trl", (
            ("grpo_vs_trl_fp32", "fp32, sdpa, 1 thread"), ("grpo_vs_trl_bf16", "bf16 autocast, eager, 1 thread"),
            ("grpo_vs_trl_bf16_2threads", "bf16 autocast, eager, 2 threads"),
            ("grpo_vs_trl_fp32_amd_shared_prompt", "fp32, sdpa, 1 thread, AMD EPYC, after the shared prompt"),
            ("grpo_vs_trl_quickstart", "quickstart workload: 1M-parameter warm-started model, binary reward, "
                                       "16 prompts x 8, 6 new tokens, fp32"))):
        o, t = f["ours"], f["trl"]
        rows.append(f"| {label} | {o['iteration_s']:.3f} | {t['iteration_s']:.3f} | {o['generate_s']:.3f} / "
                    f"{o['update_s']:.3f} | {t['generate_s']:.3f} / {t['update_s']:.3f} | "
                    f"{o['completions_per_s']:.1f} / {t['completions_per_s']:.1f} | "
                    f"**{f['ratio_iteration']:.2f}x** {verdict(f['ratio_iteration'], 1.5)} | "
                    f"**{f['ratio_update']:.2f}x** {verdict(f['ratio_update'], 2.0)} |")
        if o.get("skipped_rows_frac"):
            rows[-1] = rows[-1].replace(f"| {label} |", f"| {label} (ours skipped {o['skipped_rows_frac']:.0%} of "
                                                         "rows: inert groups) |")
    return rows


REAL_MODEL_RUNS = (("grpo_vs_trl_smollm2_fp32_lora", "fp32, LoRA r16 (q,k,v,o)"),
                   ("grpo_vs_trl_smollm2_fp32_full", "fp32, full fine-tune"),
                   ("grpo_vs_trl_smollm2_bf16_lora", "bf16 autocast, LoRA r16 (q,k,v,o)"),
                   ("grpo_vs_trl_smollm2_bf16_full", "bf16 autocast, full fine-tune"))


def real_model_rows() -> list[str]:
    """GRPO vs TRL on SmolLM2-135M-Instruct, with the update's FLOP/s against this machine's GEMM peak."""
    rows = ["| setting | ours iteration (s) | TRL iteration (s) | ours generate / update (s) | TRL generate / update "
            "(s) | iteration ratio | update ratio | update model FLOP/s ours / TRL (of GEMM peak) | executed FLOPs "
            "ours / TRL | executed FLOP/s ours / TRL (of peak) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, f in runs("grpo_throughput_vs_trl", REAL_MODEL_RUNS):
        o, t = f["ours"], f["trl"]
        peak = f.get("gemm_peak", {})
        flops = (f"{o['update_flop_per_s'] / 1e9:.0f} / {t['update_flop_per_s'] / 1e9:.0f} G ("
                 f"{o['update_peak_frac']:.0%} / {t['update_peak_frac']:.0%} of {peak['peak_flop_per_s'] / 1e9:.0f} G)"
                 if "update_flop_per_s" in o and peak else "-")
        executed = (f"{o['executed_flop_per_s'] / 1e9:.0f} / {t['executed_flop_per_s'] / 1e9:.0f} G ("
                    f"{o['executed_peak_frac']:.0%} / {t['executed_peak_frac']:.0%})"
                    if "executed_flop_per_s" in o and peak else "-")
        rows.append(f"| {label} | {o['iteration_s']:.2f} | {t['iteration_s']:.2f} | {o['generate_s']:.2f} / "
                    f"{o['update_s']:.2f} | {t['generate_s']:.2f} / {t['update_s']:.2f} | "
                    f"**{f['ratio_iteration']:.2f}x** {verdict(f['ratio_iteration'], 1.5)} | "
                    f"**{f['ratio_update']:.2f}x** {verdict(f['ratio_update'], 2.0)} | {flops} | "
                    f"{f.get('ratio_executed_flops', float('nan')):.2f}x | {executed} |")
    return rows if len(rows) > 2 else []


def gemm_rows() -> list[str]:
    payload = load("gemm_peak")
    if payload is None:
        return []
    rows = ["| precision | peak GEMM FLOP/s | at (m x k x n, layout) |", "|---|---|---|"]
    figures = first(payload, "gemm_peak")
    for dtype in ("fp32", "bf16"):
        f = (figures or {}).get("figures", {}).get(dtype)
        if f:
            best = f["best"]
            rows.append(f"| {dtype} | {f['peak_flop_per_s'] / 1e9:.1f} G | "
                        f"{best['m']} x {best['k']} x {best['n']}, {best['layout']} |")
    return rows if len(rows) > 2 else []


def grpo_memory_rows() -> list[str]:
    rows = ["| setting | ours peak RSS (MB) | TRL peak RSS (MB) | ours / TRL rise during steps (MB) | ratio |",
            "|---|---|---|---|---|"]
    for label, f in runs("grpo_peak_rss_vs_trl", (("grpo_vs_trl_fp32", "fp32"), ("grpo_vs_trl_bf16", "bf16 autocast"))):
        rows.append(f"| {label} | {f['ours']['peak_rss_mb']:.0f} | {f['trl']['peak_rss_mb']:.0f} | "
                    f"{f['ours']['peak_increase_mb']:.0f} / {f['trl']['peak_increase_mb']:.0f} | "
                    f"**{f['ratio_peak_rss']:.2f}x** {verdict(f['ratio_peak_rss'], 1.0, False)} |")
    return rows


def dpo_rows() -> list[str]:
    rows = ["| setting | ours step (s) | TRL step (s) | pairs/s ours / TRL | ratio |", "|---|---|---|---|---|"]
    for label, f in runs("dpo_throughput_vs_trl", (("dpo_vs_trl_fp32", "fp32, sdpa"),
                                                    ("dpo_vs_trl_bf16", "bf16 autocast, eager"))):
        rows.append(f"| {label} | {f['ours']['step_s']:.3f} | {f['trl']['step_s']:.3f} | "
                    f"{f['ours']['pairs_per_s']:.2f} / {f['trl']['pairs_per_s']:.2f} | "
                    f"**{f['ratio']:.2f}x** {verdict(f['ratio'], 1.5)} |")
    return rows


def memory_rows() -> list[str]:
    r = first(load("memory_logprobs"), "logprob_entropy_peak_memory")
    if r is None:
        return []
    rows = ["| logits | pass | naive extra (MB) | chunked extra (MB) | ratio | chunked, gradient in the logits (MB) | "
            "ratio | time naive / chunked (s) |", "|---|---|---|---|---|---|---|---|"]
    for key, f in r["figures"].items():
        dtype, _, rest = key.partition("_")
        inplace = f.get("chunked_grad_in_logits")
        rows.append(f"| {dtype} ({f['naive']['logits_mb']:.0f} MB) | {rest.replace('_', ' + ')} | "
                    f"{f['naive']['extra_peak_mb']:.0f} | {f['chunked']['extra_peak_mb']:.0f} | "
                    f"**{f['ratio_extra_peak']:.3f}x** | "
                    + (f"{inplace['extra_peak_mb']:.0f} | **{f['ratio_extra_peak_grad_in_logits']:.3f}x** | "
                       if inplace else "- | - | ")
                    + f"{f['naive']['seconds']:.1f} / {f['chunked']['seconds']:.1f} |")
    return rows


def rollout_rows() -> list[str]:
    r = first(load("rollout"), "rollout_throughput")
    if r is None:
        return []
    f = r["figures"]
    keys = [k for k, v in f.get("hf", {}).items() if isinstance(v, dict)]
    rows = ["| batch x max new tokens | transformers tokens/s | vLLM tokens/s | vLLM / transformers |",
            "|---|---|---|---|"]
    for key in keys:
        batch, length = key[1:].split("_t")
        hf, vl = f["hf"][key]["tokens_per_s"], f.get("vllm", {}).get(key, {}).get("tokens_per_s")
        rows.append(f"| {batch} x {length} | {hf:.0f} | {vl:.0f} | {vl / hf:.2f}x |" if vl else
                    f"| {batch} x {length} | {hf:.0f} | - | - |")
    for engine in ("hf", "vllm"):
        if engine in f:
            exps = ", ".join(f"{v:.2f} (max new tokens {k.split('_t')[-1]})" for k, v in f[engine].items()
                             if k.startswith("batch_exponent"))
            rows.append(f"\n{'transformers' if engine == 'hf' else 'vLLM'}: throughput ~ batch^k with k = {exps}; "
                        f"engine start {f[engine]['startup_s']:.1f} s.")
    return rows


ROLLOUT_WAYS = (("hf", "transformers (samples the peft model; the sync is a version bump)"),
                ("vllm_merge", "vLLM, `adapter_sync: merge` (after the first sync: the adapted modules, in memory)"),
                ("vllm_merge_full", "vLLM, merge, every weight at each sync, in memory"),
                ("vllm_merge_full_disk", "vLLM, merge, every weight at each sync through safetensors (the old way)"),
                ("vllm_native", "vLLM, `adapter_sync: native` (LoRARequest, vLLM's CPU LoRA kernels)"))


def rollout_real_rows() -> list[str]:
    """bench/rollout_real.py: engine load, first batch, steady state, and a LoRA step (sync + generate) per way."""
    r = first(load("rollout_real"), "rollout_real_model")
    if r is None:
        return []
    f = r["figures"]
    engines = [(name, label) for name, label in (("hf", "transformers `generate`"), ("vllm", "vLLM")) if name in f]
    rows = ["| | " + " | ".join(label for _, label in engines) + " |", "|---|" + "---|" * len(engines),
            "| load (s) | " + " | ".join(f"{f[n]['load_s']:.1f}" for n, _ in engines) + " |",
            "| first batch (s) | " + " | ".join(f"{f[n]['first_batch_s']:.1f}" for n, _ in engines) + " |"]
    for key in sorted({k for n, _ in engines for k in f[n] if k.startswith("t") and k[1:].isdigit()},
                      key=lambda k: int(k[1:])):
        rows.append(f"| steady state, {key[1:]} new tokens: tokens/s (mean length) | "
                    + " | ".join(f"{f[n][key]['tokens_per_s']:.0f} ({f[n][key]['mean_len']:.0f})" if key in f[n]
                                 else "-" for n, _ in engines) + " |")
    ratios = f.get("ratio_vllm_over_hf", {})
    if ratios:
        rows.append("\nvLLM / transformers tokens/s: " + ", ".join(f"{v:.2f}x at {k[1:]} new tokens"
                                                                  for k, v in ratios.items()) + ".")
    ways = {name: way for part in f.values() if isinstance(part, dict) for name, way in part.get("lora", {}).items()}
    if ways:
        rows += ["", f"A LoRA step ({r['settings'].get('lora', 'LoRA')}; {r['settings'].get('lora_length')} new "
                     "tokens; the adapter moves before every step): weight sync + generate, medians.", "",
                 "| way | sync (s) | generate (s) | step (s) | step / fastest |", "|---|---|---|---|---|"]
        over = f.get("lora_step_over_fastest", {})
        for name, label in ROLLOUT_WAYS:
            if name in ways:
                w = ways[name]
                rows.append(f"| {label} | {w['sync_s']:.2f} | {w['generate_s']:.2f} | {w['step_s']:.2f} | "
                            f"{over.get(name, float('nan')):.2f}x |")
        first_sync = next((p["first_sync_s"] for p in f.values() if isinstance(p, dict) and "first_sync_s" in p), None)
        if first_sync is not None:
            rows.append(f"\nThe first merged sync of the model sends every weight: {first_sync:.1f} s.")
    return rows


def scaling_rows() -> list[str]:
    r = first(load("scaling"), "grpo_iteration_scaling")
    if r is None:
        return []
    rows = ["| doubling | points: iteration s (generate / update) | exponent: iteration | generate | update |",
            "|---|---|---|---|---|"]
    for sweep, label in (("G", "G"), ("response_length", "max new tokens"), ("model_size", "layers (params)")):
        f = r["figures"][sweep]
        points = "; ".join(f"{k}: {v['iteration_s']:.2f} ({v['generate_s']:.2f} / {v['update_s']:.2f})"
                           for k, v in f["points"].items())
        rows.append(f"| {label} | {points} | **{f['exponent_iteration']:.2f}** | {f['exponent_generate']:.2f} | "
                    f"{f['exponent_update']:.2f} |")
    return rows


def ray_rows() -> list[str]:
    measured = runs("ray_overhead", (("ray_overhead", "weight sync through the object store"),
                                     ("ray_overhead_broadcast", "weight sync by broadcast")))
    if not measured:
        return []
    rows = ["| part of a step | " + " | ".join(f"{label}: median s (share)" for label, _ in measured) + " |",
            "|---|" + "---|" * len(measured)]
    for part, label in (("generate", "generation (inside the rollout worker)"), ("reward_compute", "reward compute"),
                        ("learner_compute", "update (slowest learner rank)"), ("weight_sync", "weight sync"),
                        ("overhead", "overhead: everything else, weight sync included")):
        rows.append(f"| {label} | " + " | ".join(f"{f[part + '_s']:.3f} ({f[part + '_s'] / f['step_s']:.0%})"
                                                  for _, f in measured) + " |")
    rows.append("| **step** | " + " | ".join(f"{f['step_s']:.3f}; overhead share (median of per-step shares) "
                                               f"**{f['overhead_frac']:.0%}**" for _, f in measured) + " |")
    return rows


def measured_on(files: tuple[str, ...]) -> str:
    """Which CPU and when the figures of ``files`` were measured (machines of this kind differ: Intel with AMX,
    AMD without; a table is only comparable with figures from its own CPU)."""
    seen: dict[str, list[str]] = {}
    for name in files:
        payload = load(name)
        if payload:
            m = payload["machine"]
            key = (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, torch threads "
                   f"{m.get('torch_threads', m.get('OMP_NUM_THREADS'))}")
            seen.setdefault(key, []).append(payload["date"])
    return " ".join(f"Measured on {cpu}, {min(d)}" + (f" to {max(d)}" if max(d) != min(d) else "") + "."
                    for cpu, d in seen.items())


def render() -> str:
    parts = ["Each table says which CPU it was measured on: Intel Xeon figures had AMX (bf16 matrix units), AMD EPYC "
             "figures had none, so bf16 runs slower than fp32 there; never compare across the two."]
    grpo_files = ("grpo_vs_trl_fp32", "grpo_vs_trl_bf16", "grpo_vs_trl_bf16_2threads", "grpo_vs_trl_quickstart",
                  "grpo_vs_trl_fp32_amd_shared_prompt")
    for title, rows, files in (
            ("GRPO iteration throughput vs TRL GRPOTrainer", grpo_rows(), grpo_files),
            ("GRPO vs TRL on the real model (SmolLM2-135M-Instruct)", real_model_rows(),
             tuple(name for name, _ in REAL_MODEL_RUNS)),
            ("Peak GEMM throughput of this machine (torch.matmul, 1 thread)", gemm_rows(), ("gemm_peak",)),
            ("GRPO peak RSS vs TRL", grpo_memory_rows(), ("grpo_vs_trl_fp32", "grpo_vs_trl_bf16")),
            ("DPO step throughput vs TRL DPOTrainer", dpo_rows(), ("dpo_vs_trl_fp32", "dpo_vs_trl_bf16")),
            ("Log-prob + entropy memory at V = 32k, B*T = 16k", memory_rows(), ("memory_logprobs",)),
            ("Rollout: vLLM vs transformers generate", rollout_rows(), ("rollout",)),
            ("Rollout on the real model (SmolLM2-135M-Instruct), LoRA weight sync", rollout_real_rows(),
             ("rollout_real",)),
            ("Scaling of a GRPO iteration", scaling_rows(), ("scaling",)),
            ("Ray runtime overhead", ray_rows(), ("ray_overhead", "ray_overhead_broadcast"))):
        if rows:
            parts.append(f"#### {title}\n\n{measured_on(files)}\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--print", action="store_true", help="print the tables instead of rewriting the document")
    args = parser.parse_args()
    tables = render()
    if args.print:
        print(tables)
        return
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} section to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{tables}\n{END}{tail}")
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
