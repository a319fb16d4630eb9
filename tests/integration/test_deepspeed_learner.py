"""The core's learner with a DeepSpeed strategy on two ranks (ZeRO-2/3, gloo, two processes) takes the same step as
the same learner with a plain torch strategy in one process: the step math exists once."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

from align import functional as F  # noqa: E402
from align.algorithms import PRESETS  # noqa: E402
from align.losses import StepNormalizer  # noqa: E402
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from align.trainers.batches import PairBatch, PolicyBatch  # noqa: E402
from align.trainers.learner import PolicyLearner, PreferenceLearner, merge_stats  # noqa: E402
from align.trainers.preference import tokenize_pairs  # noqa: E402
from align.trainers.protocols import SamplingParams  # noqa: E402
from align.trainers.rollout_hf import HFRolloutEngine  # noqa: E402
from align.trainers.strategy import Reference, TorchStrategy  # noqa: E402


def _policy_batch(model_dir: Path, spec_name: str, inert: bool) -> PolicyBatch:
    from transformers import AutoModelForCausalLM

    tokenizer = build_char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rollout = HFRolloutEngine(model, tokenizer).generate(["1+2=", "30+4=", "7+7=", "5+55="], {}, samples_per_prompt=4,
                                                         params=SamplingParams(max_new_tokens=5), seed=0)
    rewards = torch.tensor([float(len(c) % 3) for c in rollout.completions])
    rewards[::4] += 1.0  # every group has reward spread
    if inert:  # groups 1-3 get one reward each: all their advantages are 0, and rank 1 (groups 2-3) has no other
        rewards[4:] = 1.0
    spec = PRESETS.get(spec_name)
    advantages = F.advantages(spec.advantage, rewards=rewards, mask=rollout.mask, group_ids=rollout.group_ids)
    return PolicyBatch(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                       completion_ids=rollout.completion_ids, mask=rollout.mask, logp=rollout.logp,
                       advantages=advantages, group_ids=rollout.group_ids,
                       normalizer=StepNormalizer.from_masks(rollout.mask, generation_budget=8))


def _pair_batch() -> PairBatch:
    tokenizer = build_char_tokenizer()
    return tokenize_pairs(tokenizer, ["1+2=", "3+4=", "9+9=", "2+2=", "5+1="], ["3", "7", "18", "4", "6"],
                          ["4", "8", "17", "5", "60"])


def _learner(model, spec_name: str, strategy) -> PolicyLearner | PreferenceLearner:
    spec = PRESETS.get(spec_name)
    optimizer = (torch.optim.SGD(model.parameters(), lr=1.0) if strategy[0] == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    applied = strategy[1](model, optimizer, scheduler)
    reference = Reference(model, lora=False) if spec.kind == "preference" else None
    if spec.kind == "preference":
        return PreferenceLearner(spec, applied, reference, micro_batch_size=2)
    return PolicyLearner(spec, applied, micro_batch_size=4)  # several micro-batches of whole groups per rank


def _rank(rank: int, port: int, model_dir: str, batch, out: dict, optimizer: str, stage: int, spec_name: str) -> None:
    from transformers import AutoModelForCausalLM

    from ray_jobs.learner_deepspeed import DeepSpeedStrategy, init_distributed

    init_distributed(rank=rank, world_size=2, master_port=port, backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def strategy(m, o, s):
        return DeepSpeedStrategy(m, o, s, zero_stage=stage, max_grad_norm=1.0, rank=rank, world_size=2)

    learner = _learner(model, spec_name, (optimizer, strategy))
    shard = batch.shards(2)[rank]
    stats = learner.step(shard)
    out[rank] = (stats, {k: v for k, v in learner.strategy.full_state().items()})


@pytest.mark.parametrize(("optimizer", "stage", "spec_name", "inert"),
                         [("sgd", 2, "dapo", False), ("adamw", 2, "dr_grpo", False), ("adamw", 3, "gspo", False),
                          ("sgd", 2, "dapo", True), ("adamw", 2, "dpo", False)])
def test_two_zero_ranks_match_the_in_process_step(tmp_path: Path, optimizer: str, stage: int, spec_name: str,
                                                  inert: bool) -> None:
    """SGD with lr 1: the parameter change is minus the (clipped) gradient, so this compares gradients at 1e-5;
    AdamW: the whole optimiser step. ``inert``: groups with all-zero advantages are skipped by the ranks (one rank
    has nothing else) and the step still equals the in-process one over every row. dr_grpo: the ranks divide by
    the generation budget carried by the batch (8 here), not by their longest completion."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                                 intermediate_size=64, seed=4))
    model.save_pretrained(tmp_path)
    batch = _pair_batch() if spec_name == "dpo" else _policy_batch(tmp_path, spec_name, inert)

    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(tmp_path)
    start = {n: p.detach().clone() for n, p in local.named_parameters()}
    learner = _learner(local, spec_name, (optimizer, lambda m, o, s: TorchStrategy(m, o, s, max_grad_norm=1.0)))
    expected = merge_stats([learner.step(batch)])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, str(tmp_path), batch, out, optimizer, stage, spec_name), nprocs=2, join=True)
    merged = merge_stats([out[0][0], out[1][0]])
    assert merged["loss"] == pytest.approx(expected["loss"], abs=1e-6)  # the rank shares add up to the loss
    assert merged["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    if inert:
        assert out[1][0]["update/active_rows"] == 0 and merged["update/skipped_rows_frac"] == 0.75
    moved = 0.0
    for name, value in local.named_parameters():
        moved = max(moved, float((value.detach() - start[name]).abs().max()))
        for rank in (0, 1):
            torch.testing.assert_close(out[rank][1][name], value.detach(), rtol=0, atol=1e-5)
    assert moved > 1e-4  # the step did something


# -- the shared-prompt forward on ranks ---------------------------------------------------------------------------
def _spawn(fn, args: tuple, timeout: float) -> None:
    """Two ranks running ``fn(rank, *args)``; fails (killing them) if they have not finished after ``timeout`` s, as
    ranks whose collectives do not match would hang."""
    context = mp.spawn(fn, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout} s (mismatched collectives hang)")


def _sharing_rank(rank: int, port: int, model_dir: str, batch, out: dict, optimizer: str, stage: int) -> None:
    """A rank's log-probs of its shard, then its step, with every model call counted and every agreement recorded."""
    from transformers import AutoModelForCausalLM

    from ray_jobs.learner_deepspeed import DeepSpeedStrategy, init_distributed

    init_distributed(rank=rank, world_size=2, master_port=port, backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def strategy(m, o, s):
        return DeepSpeedStrategy(m, o, s, zero_stage=stage, max_grad_norm=1.0, rank=rank, world_size=2)

    learner = _learner(model, "dapo", (optimizer, strategy))
    assert learner.share_prompt  # the default, as LearnerRank keeps it
    agreements: list[tuple[list[int], list[int]]] = []
    agree = learner.strategy.agree_min

    def recorded(values):
        agreed = agree(values)
        agreements.append((list(values), agreed))
        return agreed

    learner.strategy.agree_min = recorded
    calls = [0]  # the engine's module: the engine's own forward and the shared path's direct calls alike
    learner.strategy.model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    shard = batch.shards(2)[rank]
    logp = learner.logprobs(shard)
    stats = learner.step(shard)
    out[rank] = (stats, learner.strategy.full_state(), logp, agreements, calls[0])


@pytest.mark.parametrize(("optimizer", "stage", "case"),
                         [("adamw", 3, "distinct"), ("adamw", 3, "inert")])
def test_two_zero_ranks_sharing_prompts_agree_and_match_the_in_process_step(tmp_path: Path, optimizer: str,
                                                                            stage: int, case: str) -> None:
    """Prompt sharing on (the learner's default) on two ranks: each forward's path through the model is agreed, so
    the ranks call the model as often and in the same order (ZeRO-3 gathers weights in every call) and the step
    equals the in-process one. ``distinct``: rank 1's last group has a prompt per row, so on the micro-batch holding
    it rank 1 cannot share while rank 0 can, and both run it unshared; on the other micro-batch both share.
    ``inert``: rank 1 has no active rows and steps on a one-row stand-in, which cannot share."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                                 intermediate_size=64, seed=4))
    model.save_pretrained(tmp_path)
    batch = _policy_batch(tmp_path, "dapo", inert=case == "inert")
    if case == "distinct":  # rows 12-15 (group 3, "5+55="): "5+51=", "5+52=", "5+53=" after the first
        for row, digit in zip(range(13, 16), "123", strict=True):
            batch.prompt_ids[row, -2] = tokenizer.convert_tokens_to_ids(digit)
    shards = batch.shards(2)

    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(tmp_path)
    learner = _learner(local, "dapo", (optimizer, lambda m, o, s: TorchStrategy(m, o, s, max_grad_norm=1.0)))
    assert isinstance(learner, PolicyLearner) and learner.share_prompt
    expected_logp = [learner.logprobs(s) for s in shards]
    expected = merge_stats([learner.step(batch)])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    _spawn(_sharing_rank, (port, str(tmp_path), batch, out, optimizer, stage), timeout=480)
    # the same agreements ([lowest path, -highest path]), in the same order, on both ranks; as many model calls
    assert [a for _, a in out[0][3]] == [a for _, a in out[1][3]]
    assert out[0][4] == out[1][4]
    proposals = [(p0[0], p1[0]) for (p0, _), (p1, _) in zip(out[0][3], out[1][3], strict=True)]
    shared = [a[0] == -a[1] == 2 for _, a in out[0][3]]  # every rank proposed the two-call shared path
    assert any(p0 != p1 for p0, p1 in proposals)  # a forward where the ranks proposed different paths ...
    assert not any(s for (p0, p1), s in zip(proposals, shared, strict=True) if p0 != p1)  # ... ran unshared
    assert shared[0]  # the log-probs: both shards share
    if case == "distinct":  # the log-probs and one micro-batch shared on both ranks: 2 + 2 + 1 model calls
        assert shared.count(True) == 2 and out[0][4] == 5
    for rank in (0, 1):
        torch.testing.assert_close(out[rank][2], expected_logp[rank], rtol=0, atol=1e-5)
    merged = merge_stats([out[0][0], out[1][0]])
    assert merged["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert merged["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    for name, value in local.named_parameters():
        for rank in (0, 1):
            torch.testing.assert_close(out[rank][1][name], value.detach(), rtol=0, atol=1e-5)
