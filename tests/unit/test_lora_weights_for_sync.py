"""The merged LoRA weights a vLLM sync sends: equal to peft's in-place merge, computed without touching the model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model

from align.models.tiny import TinyModelConfig, build_tiny_causal_lm
from ray_jobs.rollout_vllm import _policy_state


def _lora_model(**config: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_tiny_causal_lm(32, TinyModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                  lora_dropout=0.0, **config))  # type: ignore[arg-type]
    with torch.no_grad():  # B starts at zero: give the adapter a delta to merge
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_merged_weights_equal_peft_merge_and_leave_the_model_bit_identical() -> None:
    model = _lora_model()
    before = _snapshot(model)
    state = _policy_state(model)
    for _ in range(4):  # many syncs never move the learner's frozen base
        _policy_state(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched, not just close
    model.merge_adapter()  # peft's own merge, in place (its unmerge drifts: compared last)
    expected = {k.replace(".base_layer", ""): v.clone() for k, v in model.get_base_model().state_dict().items()
                if "lora_" not in k}
    model.unmerge_adapter()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name  # the same sum W + delta, bit for bit
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_only_the_named_weights_and_an_adapter_variant_falls_back_to_peft_merge() -> None:
    model = _lora_model(use_dora=True)  # DoRA: the merge is not W + delta, peft's own merge runs
    names = {"model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight"}
    state = _policy_state(model, names)
    assert state.keys() == names
    model.merge_adapter()
    merged = model.get_base_model().state_dict()
    for name in names:
        key = name.replace(".weight", ".base_layer.weight")
        # close, not equal: peft's unmerge after the first merge does not restore W exactly (the drift avoided above)
        assert torch.allclose(state[name], merged[key], atol=1e-6, rtol=0)
