#!/usr/bin/env bash
# Every figure of docs/benchmarks.md, one script after another (never side by side: they share the cores), each
# writing its JSON into docs/bench-results/. Run from the repository root: bench/run_all.sh  (about 75 minutes on a 2-core AMD EPYC)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-.venv/bin/python}
OUT=docs/bench-results
mkdir -p "$OUT"
$PY bench/grpo_vs_trl.py --memory --json "$OUT/grpo_vs_trl_fp32.json"
$PY bench/grpo_vs_trl.py --precision bf16 --attn eager --memory --json "$OUT/grpo_vs_trl_bf16.json"
$PY bench/grpo_vs_trl.py --precision bf16 --attn eager --threads 2 --json "$OUT/grpo_vs_trl_bf16_2threads.json"
$PY bench/grpo_vs_trl.py --size quickstart --reward exact --prompts 16 --max-new-tokens 6 --lr 2e-4 \
    --json "$OUT/grpo_vs_trl_quickstart.json"
$PY bench/dpo_vs_trl.py --json "$OUT/dpo_vs_trl_fp32.json"
$PY bench/dpo_vs_trl.py --precision bf16 --attn eager --json "$OUT/dpo_vs_trl_bf16.json"
$PY bench/memory_logprobs.py --json "$OUT/memory_logprobs.json"
$PY bench/rollout.py --json "$OUT/rollout.json"
$PY bench/rollout_real.py --json "$OUT/rollout_real.json"
$PY bench/scaling.py --json "$OUT/scaling.json"
$PY bench/ray_overhead.py --json "$OUT/ray_overhead.json"
$PY bench/ray_overhead.py --set runtime.weight_sync=broadcast --json "$OUT/ray_overhead_broadcast.json"
$PY bench/shared_prefix.py --out "$OUT/shared_prefix.json"
# the real model (SmolLM2-135M-Instruct): its GEMM peak first, which the GRPO runs report their FLOP/s against
$PY bench/gemm_peak.py --json "$OUT/gemm_peak.json"
REAL=(--size smollm2 --prompts 2 --group-size 4 --gemm-peak "$OUT/gemm_peak.json")
$PY bench/grpo_vs_trl.py "${REAL[@]}" --lora --max-new-tokens 32 --rounds 4 --warmup 1 --steps 3 \
    --json "$OUT/grpo_vs_trl_smollm2_fp32_lora.json"
$PY bench/grpo_vs_trl.py "${REAL[@]}" --max-new-tokens 32 --rounds 3 --warmup 1 --steps 2 \
    --json "$OUT/grpo_vs_trl_smollm2_fp32_full.json"
# bf16: one round of 16 new tokens (a bf16 iteration takes 65-100 s on a CPU without AMX)
$PY bench/grpo_vs_trl.py "${REAL[@]}" --lora --precision bf16 --attn eager --max-new-tokens 16 --rounds 1 \
    --warmup 1 --steps 2 --json "$OUT/grpo_vs_trl_smollm2_bf16_lora.json"
$PY bench/grpo_vs_trl.py "${REAL[@]}" --precision bf16 --attn eager --max-new-tokens 16 --rounds 1 --warmup 1 \
    --steps 2 --json "$OUT/grpo_vs_trl_smollm2_bf16_full.json"
