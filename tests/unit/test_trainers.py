"""Trainer building blocks: rollouts agree with the learner, samplers resume, checkpoints are atomic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.protocols import SamplingParams
from align.trainers.rollout_hf import HFRolloutEngine
from align.trainers.sampler import PromptSampler
from align.trainers.sequences import mask_after_eos, response_forward

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer()
    return build_tiny_causal_lm(len(tokenizer), SMALL), tokenizer


def test_mask_after_eos_keeps_the_first_eos() -> None:
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert mask_after_eos(ids, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_rollout_log_probs_match_the_learner_forward(tiny) -> None:
    model, tokenizer = tiny
    engine = HFRolloutEngine(model, tokenizer)
    torch.manual_seed(0)
    rollout = engine.generate(["12+3=", "7+45=", "9="], {"answer": ["15", "52", "9"]}, samples_per_prompt=4,
                              params=SamplingParams(max_new_tokens=5, temperature=0.7))
    assert rollout.completion_ids.shape[0] == 12 and rollout.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert rollout.columns["answer"][4] == "52" and rollout.prompts[8] == "9="
    with torch.no_grad():
        logp, _, _ = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.mask, temperature=0.7)
    gap = ((logp - rollout.logp).abs() * rollout.mask).max()
    assert gap < 1e-4, gap  # left padding and KV cache change nothing but rounding
    assert (rollout.logp[rollout.mask == 0] == 0).all()


def test_response_forward_scores_only_the_completion_positions_and_its_gradients_match(tiny) -> None:
    """logits_to_keep (LM head on the last T+1 positions) and the gradient written into the logits give the same
    log-probs and parameter gradients as the plain full-sequence forward, which models without logits_to_keep
    take."""
    model, _ = tiny

    class NoKeep(torch.nn.Module):  # a forward without logits_to_keep: response_forward falls back
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    prompt_ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    completion_ids = torch.tensor([[12, 13, 2], [14, 2, 0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    results = []
    for m in (model, NoKeep(model)):
        model.zero_grad(set_to_none=True)
        logp, entropy, _ = response_forward(m, prompt_ids, prompt_mask, completion_ids, mask, temperature=0.8,
                                            with_entropy=True)
        (logp * mask).sum().backward()
        results.append((logp.detach(), entropy, [p.grad.clone() for p in model.parameters()]))
    (a, ea, ga), (b, eb, gb) = results
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ea, eb, atol=1e-6, rtol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_prompt_sampler_resumes_exactly() -> None:
    a = PromptSampler(10, seed=1)
    first = a.next(7) + a.next(7)  # crosses an epoch
    b = PromptSampler(10, seed=1)
    b.next(7)
    c = PromptSampler(10, seed=99)
    c.load_state_dict(b.state_dict())
    assert first[7:] == c.next(7)
    assert sorted(first[:10]) == list(range(10))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.0, betas=(0.9, 0.99))
    scheduler = build_scheduler(optimizer, kind="cosine", warmup_steps=2, total_steps=10)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 3)
    save_checkpoint(tmp_path, step=3, model=model, optimizer=optimizer, scheduler=scheduler, extra={"k": 1})
    _train(model, optimizer, scheduler, 2)
    expected = model.weight.detach().clone()
    fresh, fresh_opt, fresh_sched = _setup(seed=5)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state.step == 3 and state.extra == {"k": 1}
    _train(fresh, fresh_opt, fresh_sched, 2)
    torch.testing.assert_close(fresh.weight, expected, rtol=0, atol=0)


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, optimizer, scheduler = _setup()
    save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=scheduler, extra={})
    good = model.weight.detach().clone()
    _train(model, optimizer, scheduler, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path, step=2, model=model, optimizer=optimizer, scheduler=scheduler, extra={})
    monkeypatch.undo()
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000001"
    assert not (tmp_path / "step-00000002").exists()
    restored, opt, sched = _setup(seed=7)
    load_checkpoint(latest, model=restored, optimizer=opt, scheduler=sched)
    torch.testing.assert_close(restored.weight, good, rtol=0, atol=0)


def test_a_crash_between_rename_and_pointer_update_is_harmless(tmp_path: Path, monkeypatch) -> None:
    model, optimizer, scheduler = _setup()
    save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=scheduler, extra={})
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("latest"):
            raise OSError("killed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path, step=2, model=model, optimizer=optimizer, scheduler=scheduler, extra={})
    assert latest_checkpoint(tmp_path).name == "step-00000001"  # the pointer still names a whole checkpoint


def test_checkpoint_keeps_only_the_newest(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup()
    for step in range(1, 5):
        save_checkpoint(tmp_path, step=step, model=model, optimizer=optimizer, scheduler=scheduler, extra={}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]


def test_eos_stays_trainable_when_it_is_also_the_pad_token(tiny, monkeypatch) -> None:
    model, tokenizer = tiny
    engine = HFRolloutEngine(model, tokenizer)
    engine.pad_id = engine.eos_id  # as for Llama or Qwen tokenizers without a pad token
    fixed = torch.tensor([[5, 6, engine.eos_id, engine.eos_id], [7, 8, 9, 10]])
    monkeypatch.setattr(engine, "_generate", lambda ids, mask, params: (fixed[: len(ids)], torch.zeros(2, 4)))
    rollout = engine.generate(["1+1="], {}, samples_per_prompt=2, params=SamplingParams(max_new_tokens=4))
    assert rollout.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_resume_only_picks_runs_of_the_same_recipe(tmp_path: Path) -> None:
    from align.api import find_resumable_run
    from align.config import recipe_from_dict

    recipe = recipe_from_dict({"name": "grpo", "rewards": [{"name": "exact_match"}],
                               "logging": {"dir": str(tmp_path)}})
    model, optimizer, scheduler = _setup()
    for name in ("grpo-20260101-000000", "grpo-lora-20260101-000000"):
        save_checkpoint(tmp_path / name / "checkpoints", step=1, model=model, optimizer=optimizer,
                        scheduler=scheduler, extra={})
    assert find_resumable_run(recipe, True).name == "grpo-20260101-000000"


def test_dr_grpo_normaliser_is_the_generation_budget() -> None:
    from align.config import recipe_from_dict

    recipe = recipe_from_dict({"algorithm": {"preset": "dr_grpo"}, "rollout": {"max_new_tokens": 37},
                               "rewards": [{"name": "exact_match"}]})
    assert recipe.algorithm_spec().generation_budget == 37
