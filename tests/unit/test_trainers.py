"""Trainer building blocks: rollouts agree with the learner, samplers resume, checkpoints are atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from align.losses import StepNormalizer
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.batches import PolicyBatch
from align.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from align.trainers.learner import PolicyLearner, merge_stats
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.protocols import SamplingParams
from align.trainers.rollout_hf import HFRolloutEngine
from align.trainers.sampler import PromptSampler
from align.trainers.sequences import mask_after_eos, response_forward
from align.trainers.strategy import TorchStrategy

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
    # the gradient reaching the LM head's output is written into that output's own memory (no second buffer)
    seen: dict[str, int] = {}

    def capture(module, args, output):
        seen["logits"] = output.data_ptr()
        output.register_hook(lambda grad: seen.__setitem__("grad", grad.data_ptr()))

    handle = model.lm_head.register_forward_hook(capture)
    logp, _, _ = response_forward(model, prompt_ids, prompt_mask, completion_ids, mask)
    (logp * mask).sum().backward()
    handle.remove()
    assert seen["grad"] == seen["logits"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ea, eb, atol=1e-6, rtol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_entropy_is_taken_from_the_raw_logits_unless_asked_for_the_sampling_temperature() -> None:
    """GTPO's official code filters and shifts by the entropy of the raw logits (temperature 1), whatever the sampling
    temperature. Logits (0, ln 3) give p = (1/4, 3/4) and H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351; at the sampling
    temperature 0.5 the logits are (0, 2 ln 3), p = (1/10, 9/10), H = 0.3250830 and log p(token 1) = ln 0.9."""
    from types import SimpleNamespace

    def model(input_ids, attention_mask, position_ids, logits_to_keep):
        step = torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))], dtype=torch.float64)
        return SimpleNamespace(logits=step.expand(input_ids.shape[0], logits_to_keep, 2))

    args = (model, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), torch.ones(1, 3, dtype=torch.long),
            torch.ones(1, 3))
    logp, raw, _ = response_forward(*args, temperature=0.5, with_entropy=True)
    _, sampled, _ = response_forward(*args, temperature=0.5, with_entropy=True, entropy_temperature=None)
    torch.testing.assert_close(raw, torch.full((1, 3), 0.5623351, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(sampled, torch.full((1, 3), 0.3250830, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(logp, torch.full((1, 3), 0.9, dtype=torch.float64).log(), rtol=0, atol=1e-6)


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
    return model, optimizer, scheduler, TorchStrategy(model, optimizer, scheduler, max_grad_norm=None)


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()  # torch's RNG: restored by a checkpoint
        optimizer.step()
        scheduler.step()


def _save(directory: Path, step: int, strategy: TorchStrategy, extra: dict | None = None, keep: int = 2) -> Path:
    return save_checkpoint(directory, step=step, save_learner=strategy.save, extra=extra or {}, keep=keep)


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    model, optimizer, scheduler, strategy = _setup()
    _train(model, optimizer, scheduler, 3)
    _save(tmp_path, 3, strategy, {"k": 1})
    _train(model, optimizer, scheduler, 2)
    expected = model.weight.detach().clone()
    fresh, fresh_opt, fresh_sched, fresh_strategy = _setup(seed=5)
    state = load_checkpoint(latest_checkpoint(tmp_path), load_learner=fresh_strategy.load)
    assert state.step == 3 and state.extra == {"k": 1}
    _train(fresh, fresh_opt, fresh_sched, 2)
    torch.testing.assert_close(fresh.weight, expected, rtol=0, atol=0)


def test_checkpoint_files_are_synced_to_disk(tmp_path: Path, monkeypatch) -> None:
    """Every file of the checkpoint (the learner's, nested, included) is fsynced before the rename."""
    synced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    *_, strategy = _setup()

    def nested(path: Path) -> None:
        strategy.save(path)
        (path / "shard").mkdir()
        (path / "shard" / "part.pt").write_bytes(b"x")

    save_checkpoint(tmp_path, step=1, save_learner=nested, extra={})
    written = {p.name for p in (tmp_path / "step-00000001").rglob("*") if p.is_file()}
    assert written == {"model.safetensors", "optimizer.pt", "part.pt", "rng.pt", "state.json"}
    assert {Path(p).name for p in synced} >= written | {f".latest.tmp-{os.getpid()}"}  # the pointer, pre-rename


def test_a_checkpoint_of_another_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    *_, strategy = _setup()
    path = _save(tmp_path, 1, strategy)
    (path / "state.json").write_text(json.dumps({"step": 1, "extra": {}}))  # what version 1 wrote
    with pytest.raises(ValueError, match="schema 1"):
        load_checkpoint(path, load_learner=strategy.load)


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, optimizer, scheduler, strategy = _setup()
    _save(tmp_path, 1, strategy)
    good = model.weight.detach().clone()
    _train(model, optimizer, scheduler, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="injected"):
        _save(tmp_path, 2, strategy)
    monkeypatch.undo()
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000001"
    assert not (tmp_path / "step-00000002").exists()
    restored, *_, restored_strategy = _setup(seed=7)
    load_checkpoint(latest, load_learner=restored_strategy.load)
    torch.testing.assert_close(restored.weight, good, rtol=0, atol=0)


def test_a_crash_between_rename_and_pointer_update_is_harmless(tmp_path: Path, monkeypatch) -> None:
    *_, strategy = _setup()
    _save(tmp_path, 1, strategy)
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("latest"):
            raise OSError("killed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="injected"):
        _save(tmp_path, 2, strategy)
    assert latest_checkpoint(tmp_path).name == "step-00000001"  # the pointer still names a whole checkpoint


def test_checkpoint_keeps_only_the_newest(tmp_path: Path) -> None:
    *_, strategy = _setup()
    for step in range(1, 5):
        _save(tmp_path, step, strategy, keep=2)
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
    *_, strategy = _setup()
    for name in ("grpo-20260101-000000", "grpo-lora-20260101-000000"):
        _save(tmp_path / name / "checkpoints", 1, strategy)
    assert find_resumable_run(recipe, True).name == "grpo-20260101-000000"


def test_dr_grpo_normaliser_is_the_generation_budget() -> None:
    from align.config import recipe_from_dict

    recipe = recipe_from_dict({"algorithm": {"preset": "dr_grpo"}, "rollout": {"max_new_tokens": 37},
                               "rewards": [{"name": "exact_match"}]})
    assert recipe.algorithm_spec().generation_budget == 37


def _policy_learner(model, spec_name: str, micro_batch_size: int = 2, **spec_changes) -> PolicyLearner:
    from dataclasses import replace

    from align.algorithms import PRESETS

    spec = replace(PRESETS.get(spec_name), **spec_changes)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10)
    return PolicyLearner(spec, TorchStrategy(model, optimizer, scheduler, max_grad_norm=1.0),
                         micro_batch_size=micro_batch_size)


def _batch_with_logp(model):
    from align.trainers.protocols import Rollout

    prompt_ids = torch.tensor([[5, 6], [5, 6], [7, 8], [7, 8], [9, 10], [9, 10]])
    completion_ids = torch.tensor([[11, 2, 0], [12, 13, 2], [14, 2, 0], [15, 16, 17], [18, 2, 0], [19, 20, 2]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        logp, _, _ = response_forward(model, prompt_ids, torch.ones_like(prompt_ids), completion_ids, mask)
    return Rollout(prompts=[""] * 6, completions=[""] * 6, prompt_ids=prompt_ids,
                   prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids, mask=mask,
                   logp=logp * mask, group_ids=torch.tensor([0, 0, 1, 1, 2, 2]), weight_version=0)


def _train_batch(rollout, advantages: torch.Tensor, budget: int | None = None) -> PolicyBatch:
    return PolicyBatch(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                       completion_ids=rollout.completion_ids, mask=rollout.mask, logp=rollout.logp,
                       advantages=advantages, group_ids=rollout.group_ids,
                       normalizer=StepNormalizer.from_masks(rollout.mask, generation_budget=budget))


@pytest.mark.parametrize("inert_groups", [(1,), (0, 1, 2)])
def test_skipping_inert_groups_leaves_the_update_unchanged(inert_groups, monkeypatch) -> None:
    """Groups whose advantages are all 0 are skipped (no forward, no backward) and the optimiser step is the same
    as computing their zero gradient, also when every group is inert (Adam still steps on zero gradients)."""
    import align.trainers.learner as learner_module

    params = []
    for skip in (True, False):
        torch.manual_seed(0)
        model = build_tiny_causal_lm(len(build_char_tokenizer()), SMALL)
        learner = _policy_learner(model, "grpo", kl=None, kl_coef=0.0)
        batch = _batch_with_logp(model)
        advantages = torch.tensor([[1.0], [-1.0], [0.5], [-0.5], [2.0], [-2.0]]).expand(6, 3) * batch.mask
        for g in inert_groups:
            advantages = torch.where((batch.group_ids == g)[:, None], 0.0, advantages)
        if not skip:
            monkeypatch.setattr(learner_module, "active_rows",
                                lambda spec, adv, mask, group_ids: torch.ones(len(group_ids), dtype=torch.bool))
        metrics = merge_stats([learner.step(_train_batch(batch, advantages))])
        monkeypatch.undo()
        assert metrics["update/skipped_rows_frac"] == pytest.approx(len(inert_groups) / 3 if skip else 0.0)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rows_are_never_skipped_when_zero_advantage_still_moves_the_loss() -> None:
    from dataclasses import replace

    from align.algorithms import PRESETS
    from align.objective import zero_advantage_is_inert

    assert zero_advantage_is_inert(replace(PRESETS.get("grpo"), kl=None, kl_coef=0.0))
    assert zero_advantage_is_inert(PRESETS.get("gspo")) and zero_advantage_is_inert(PRESETS.get("dapo"))
    assert zero_advantage_is_inert(PRESETS.get("rloo"))  # its KL sits in the reward, hence in the advantages
    assert not zero_advantage_is_inert(PRESETS.get("grpo"))  # k3 KL in the loss acts at A = 0
    assert not zero_advantage_is_inert(PRESETS.get("gtpo"))  # the entropy term acts at A = 0


def test_active_rows_keeps_whole_groups_with_any_nonzero_advantage() -> None:
    from dataclasses import replace

    from align.algorithms import PRESETS
    from align.objective import active_rows

    group_ids = torch.tensor([7, 7, 3, 3, 9, 9])  # ids need not be 0..G-1 nor sorted
    mask = torch.tensor([[1.0, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 0]])
    advantages = torch.tensor([[0.0, 0], [0, 5], [0, 0], [0, 0], [0, 0], [0.0, 0]])
    advantages[4, 1] = -1.0  # group 9: one nonzero token; group 7: nonzero only under the mask's padding
    inert_spec = replace(PRESETS.get("grpo"), kl=None, kl_coef=0.0)
    assert active_rows(inert_spec, advantages, mask, group_ids).tolist() == [False, False, False, False, True, True]
    assert active_rows(PRESETS.get("grpo"), advantages, mask, group_ids).all()  # KL in the loss: nothing skipped
