"""The paths a real pretrained model takes: SmolLM2-135M-Instruct, converted offline from its pinned PyPI package.

Kept short (each test a few seconds to a minute on 2 cores): the named model resolves and converts once into the
cache outside the clone, its BPE chat template renders a system turn, a LoRA adapter round-trips through peft (and
merges), two LoRA GRPO steps run end to end on the word-problem task, and vLLM serves the adapter natively with the
learner's log-probs (tests/integration/test_vllm_engine.py has the tiny-model engine tests).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from align import api
from align.build import cache_root, policy_model, render_prompts
from align.config import load_recipe
from align.models.named import NAMED_MODELS, prepare_named_model
from align.trainers.protocols import SamplingParams
from align.trainers.sequences import encode, response_forward

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "lora_smollm2.yaml"
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def recipe() -> Any:
    return load_recipe(RECIPE)


@pytest.fixture(scope="module")
def model_dir(recipe: Any) -> Path:
    return prepare_named_model(NAME, cache_root(recipe), log=lambda _: None)


def _perturb_adapter(model: Any, seed: int) -> None:
    """LoRA starts as the identity (B = 0); give it a non-trivial update so tests can tell adapters apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def test_the_named_model_is_the_pinned_package_converted_once(model_dir: Path) -> None:
    info = json.loads((model_dir / "align_named.json").read_text())
    assert info["version"] == NAMED_MODELS[NAME].version
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # saved as a plain checkpoint, loadable by peft and vLLM
    assert prepare_named_model(NAME, model_dir.parents[1], log=lambda line: pytest.fail(line)) == model_dir


def test_chat_template_renders_the_system_turn_and_tokenizes_without_double_specials(recipe: Any,
                                                                                   model_dir: Path) -> None:
    tokenizer = api.load_model(model_dir, recipe)[1]
    [text] = render_prompts(["Ava has 3 books. How many books does Ava have now?"], tokenizer, recipe)
    assert text == ("<|im_start|>system\nAnswer with only the final number.<|im_end|>\n"
                    "<|im_start|>user\nAva has 3 books. How many books does Ava have now?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    [ids] = encode(tokenizer, [text])
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids.count(start) == 3  # the template's own markers, none added twice
    assert tokenizer.decode(ids) == text


def test_lora_adapter_round_trips_through_peft_and_merges(recipe: Any, model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = policy_model(model_dir, recipe)
    _perturb_adapter(model, seed=1)
    ids = torch.tensor([[1, 504, 3458, 314, 216, 33, 1073, 216, 34]])
    with torch.no_grad():
        expected = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the model
    model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 10 * 2**20  # the adapter alone
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                         tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)


def _short(tmp_path: Path, *extra: str) -> Any:
    return api.train(RECIPE, f"logging.dir={tmp_path}", "logging.tensorboard=false", "learner.steps=2",
                     "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=12",
                     "data.eval_size=6", "data.train_size=40", "logging.eval_every=2", "checkpoint.every=2",
                     *extra, progress=False, log=lambda _: None)


def test_two_lora_grpo_steps_on_the_real_model(tmp_path: Path) -> None:
    result = _short(tmp_path)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # the engine samples the learner's own weights (a step whose groups all got equal rewards skips its update)
    assert all(r["logprob_gap/rollout_vs_learner"] < 1e-4 for r in steps if "logprob_gap/rollout_vs_learner" in r)
    assert [r["weight_version"] for r in steps] == [1.0, 2.0]
    assert 0.0 <= result.metrics["eval/accuracy_after"] <= 1.0
    final = result.run_dir / "final"
    assert (final / "adapter_config.json").is_file() and (final / "chat_template.jinja").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter, not a 0.5 GB copy of the base


@pytest.mark.vllm
def test_vllm_serves_the_adapter_natively_with_the_learners_log_probs(recipe: Any, model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from ray_jobs.rollout_vllm import _factory

    model, tokenizer = policy_model(model_dir, recipe)
    model.eval()
    _perturb_adapter(model, seed=2)
    engine = _factory(model, tokenizer, model_dir, {"max_model_len": 256, "kv_cache_bytes": 128 * 2**20,
                                                          "adapter_sync": "native"})
    try:
        assert engine.lora_rank == recipe.lora.r
        prompts = render_prompts(["Ava has 3 books. Then Ava buys 4 more books. How many books does Ava have now?"],
                                 tokenizer, recipe)
        params = SamplingParams(max_new_tokens=8, temperature=0.7)

        def gap() -> float:
            rollout = engine.generate(prompts, {"answer": ["7"]}, samples_per_prompt=2, params=params, seed=3)
            with torch.no_grad():
                logp, _, _ = response_forward(model, rollout.prompt_ids, rollout.prompt_mask,
                                              rollout.completion_ids, rollout.mask, temperature=0.7)
            return float(((logp - rollout.logp).abs() * rollout.mask).max())

        assert gap() < 1e-3
        _perturb_adapter(model, seed=3)  # a new policy: the engine still serves adapter v0 until the sync
        assert gap() > 1e-2
        engine.sync_weights(model, 1)
        assert engine.weight_version == 1 and re.fullmatch(r"policy-v1", engine._adapter.lora_name)
        assert gap() < 1e-3
    finally:
        engine.close()
