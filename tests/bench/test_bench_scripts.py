"""Each benchmark script runs end to end on a tiny setting and writes coherent figures. No timing is asserted
here (speed and memory goals are met in bench/, see docs/benchmarks.md); only what must hold on any machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_bench(script: str, tmp_path: Path, *args: str, timeout: int = 600) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "ALIGN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *args, "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["machine"]["cores"] >= 1
    return {r["name"]: r for r in payload["results"]}


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_grpo_vs_trl_tiny(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    results = run_bench("grpo_vs_trl", tmp_path, "--size", "tiny", "--rounds", "2", "--steps", "1", "--warmup", "1",
                        "--max-new-tokens", "4", "--prompts", "2", "--group-size", "4", "--memory", "--gemm-sizes",
                        "32", "--gemm-repeats", "1", "--gemm-min-seconds", "0.001")  # a small in-process GEMM peak
    speed = results["grpo_throughput_vs_trl"]["figures"]
    for side in ("ours", "trl"):
        assert speed[side]["steps_measured"] == 2  # one measured step per run, two runs (interleaved) per side
        assert 0 < speed[side]["generate_s"] < speed[side]["iteration_s"]
        assert positive(speed[side]["update_s"])
    assert positive(speed["ratio_iteration"]) and positive(speed["ratio_update"])
    memory = results["grpo_peak_rss_vs_trl"]["figures"]
    for side in ("ours", "trl"):
        assert memory[side]["peak_rss_mb"] >= memory[side]["rss_before_steps_mb"] > 100  # torch alone is >100 MB
    assert positive(memory["ratio_peak_rss"])


def test_grpo_vs_trl_lora_flops_tiny(tmp_path: Path) -> None:
    """--lora through both trainers, chat-rendered prompts, and the update's FLOP/s against an in-process GEMM peak:
    the same prompt tokens reach both sides, and the work counts are consistent with what each side runs."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    results = run_bench("grpo_vs_trl", tmp_path, "--size", "tiny", "--lora", "--prompt-format", "chat", "--rounds",
                        "1", "--steps", "1", "--warmup", "1", "--max-new-tokens", "4", "--prompts", "2",
                        "--group-size", "4", "--gemm-sizes", "32,64", "--gemm-repeats", "1", "--gemm-min-seconds",
                        "0.001")
    result = results["grpo_throughput_vs_trl"]
    assert result["settings"]["fine_tune"].startswith("LoRA r16")
    assert result["settings"]["parameters"]["lora_adapter"] > 0
    figures = result["figures"]
    assert positive(figures["gemm_peak"]["peak_flop_per_s"]) and figures["gemm_peak"]["dtype"] == "fp32"
    ours, trl = figures["ours"], figures["trl"]
    for side in (ours, trl):
        assert side["steps_measured"] == 1 and side["foreign_prompt_rows"] == 0
        work = side["work_per_step"]
        assert work["rows"] == 8 and work["prompt_tokens"] > 0 and 8 <= work["completion_tokens"] <= 32
        assert work["nograd_positions"] == 0  # one optimiser step per generation, beta 0: no extra forward
        flops = side["flops_per_step"]
        assert flops["update_flops"] == flops["model_flops"] > 0
        assert positive(side["update_flop_per_s"]) and positive(side["update_peak_frac"])
    # TRL runs every row's whole prompt + completion (padding included); ours each group's prompt once, trimmed: with
    # prompts of 4-6 characters and at most 4 new tokens, at most 2 x 6 + 8 x 3 = 36 positions against TRL's >= 40
    assert trl["work_per_step"]["grad_positions"] >= trl["work_per_step"]["prompt_tokens"] + 8
    assert ours["work_per_step"]["grad_positions"] < trl["work_per_step"]["grad_positions"]
    assert positive(figures["ratio_executed_flops"])


def test_gemm_peak_tiny(tmp_path: Path) -> None:
    results = run_bench("gemm_peak", tmp_path, "--sizes", "16,32", "--shapes", "8x16x24", "--repeats", "2",
                        "--min-seconds", "0.001")
    figures = results["gemm_peak"]["figures"]
    assert figures["torch_threads"] == 1
    for dtype in ("fp32", "bf16"):
        rows = figures[dtype]["shapes"]
        assert {r["layout"] for r in rows} == {"nt", "nn", "tn"}
        assert all(positive(r["flop_per_s"]) for r in rows)
        assert figures[dtype]["peak_flop_per_s"] == max(r["flop_per_s"] for r in rows)


def test_dpo_vs_trl_tiny(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    results = run_bench("dpo_vs_trl", tmp_path, "--size", "tiny", "--rounds", "2", "--steps", "1", "--warmup", "1",
                        "--pairs", "4", "--response-chars", "8")
    figures = results["dpo_throughput_vs_trl"]["figures"]
    assert figures["ours"]["steps_measured"] == figures["trl"]["steps_measured"] == 2
    assert positive(figures["ratio"])


def test_memory_logprobs_small_vocab(tmp_path: Path) -> None:
    # 2048 x 8000 fp32 logits (62.5 MiB): the naive forward holds log_softmax, exp and a product (~3x the
    # logits); the chunked one a 16 MiB chunk or two. The gap is large enough to survive allocator noise.
    results = run_bench("memory_logprobs", tmp_path, "--vocab", "8000", "--tokens", "2048", "--dtypes", "fp32")
    figures = results["logprob_entropy_peak_memory"]["figures"]
    forward = figures["fp32_forward"]
    assert forward["naive"]["extra_peak_mb"] > 2 * forward["naive"]["logits_mb"]
    assert forward["ratio_extra_peak"] < 0.5
    assert positive(figures["fp32_forward_backward"]["ratio_extra_peak"])


def test_rollout_tiny(tmp_path: Path) -> None:
    engines = "hf,vllm" if _has("vllm") else "hf"
    results = run_bench("rollout", tmp_path, "--size", "tiny", "--engines", engines, "--batches", "2,4",
                        "--lengths", "4", "--repeats", "1")
    figures = results["rollout_throughput"]["figures"]
    for engine in engines.split(","):
        assert positive(figures[engine]["b2_t4"]["tokens_per_s"])
        assert 1 <= figures[engine]["b4_t4"]["mean_len"] <= 4
        assert math.isfinite(figures[engine]["batch_exponent_t4"])
    if "vllm" in figures:
        assert positive(figures["ratio_vllm_over_hf"]["b4_t4"])


def test_scaling_tiny(tmp_path: Path) -> None:
    results = run_bench("scaling", tmp_path, "--sizes", "tiny,tiny", "--group-sizes", "2,4", "--lengths", "2,4",
                        "--steps", "1", "--warmup", "1", "--prompts", "2")
    figures = results["grpo_iteration_scaling"]["figures"]
    for sweep in ("G", "response_length", "model_size"):
        assert len(figures[sweep]["points"]) >= 1
        assert math.isfinite(figures[sweep]["exponent_iteration"])


@pytest.mark.ray
def test_ray_overhead_tiny(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    recipe = {
        "name": "bench_ray_tiny", "seed": 0,
        "model": {"path": "tiny", "sft_warmup": None, "cache_dir": str(tmp_path / "models"),
                  "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
        "data": {"task": "arithmetic", "task_options": {"digits": 1}, "eval_size": 10, "train_size": 90},
        "rollout": {"engine": "hf", "samples_per_prompt": 4, "prompts_per_step": 2, "max_new_tokens": 4},
        "algorithm": {"preset": "grpo", "overrides": {"kl": None, "kl_coef": 0.0}},
        "rewards": [{"name": "exact_match", "options": {"extract": "full"}}],
        "runtime": {"backend": "ray", "learners": 1, "reward_workers": 1},
        "learner": {"lr": 1e-3, "steps": 3},
        "logging": {"tensorboard": False, "progress": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    results = run_bench("ray_overhead", tmp_path, "--recipe", str(path), "--steps", "3", "--warmup", "1")
    figures = results["ray_overhead"]["figures"]
    assert figures["steps_measured"] == 2
    assert 0.0 <= figures["overhead_frac"] < 1.0
    parts = figures["generate_s"] + figures["reward_compute_s"] + figures["learner_compute_s"]
    assert parts <= figures["step_s"] * 1.05  # medians of parts may not add up exactly; the work fits in the step


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_shared_prefix_tiny(tmp_path: Path) -> None:
    """bench/shared_prefix.py on SmolLM2 at the smallest setting: both paths run and agree on the log-probs."""
    out = tmp_path / "shared_prefix.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "shared_prefix.py"), "--out", str(out), "--repeats",
                          "1", "--group-sizes", "4", "--modes", "lora", "--rows", "4", "--answer-tokens", "4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(out.read_text())
    (result,) = payload["results"]
    assert result["G"] == 4 and positive(result["unshared_median_s"]) and positive(result["shared_median_s"])
    assert result["max_abs_logp_gap"] < 1e-3
