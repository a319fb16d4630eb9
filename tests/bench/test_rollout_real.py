"""bench/rollout_real.py runs end to end on the tiny model (transformers and vLLM, every merge way of a LoRA
sync) and writes coherent figures. No timing is asserted: only what must hold on any machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_rollout_real_tiny(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    out = tmp_path / "rollout_real.json"
    env = {**os.environ, "ALIGN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout_real.py"), "--size", "tiny", "--engines",
                          "hf,vllm", "--prompts", "2", "--samples", "2", "--lengths", "4", "--repeats", "1",
                          "--lora-steps", "1", "--lora-length", "4", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [result] = json.loads(out.read_text())["results"]
    figures = result["figures"]
    for engine in ("hf", "vllm"):
        table = figures[engine]
        assert table["load_s"] > 0 and table["first_batch_s"] > 0
        assert table["t4"]["tokens_per_s"] > 0 and 0 < table["t4"]["mean_len"] <= 4
    ways = {**figures["hf"]["lora"], **figures["vllm"]["lora"]}
    assert set(ways) == {"hf", "vllm_merge", "vllm_merge_full", "vllm_merge_full_disk"}
    for way in ways.values():
        assert way["steps"] == 1
        assert math.isclose(way["step_s"], way["sync_s"] + way["generate_s"])  # one step: the medians add up
        assert way["tokens_per_s"] > 0
    assert figures["vllm"]["first_sync_s"] > 0
    assert figures["lora_fastest"] in ways and min(figures["lora_step_over_fastest"].values()) == 1.0
    assert set(figures["ratio_vllm_over_hf"]) == {"t4"}
