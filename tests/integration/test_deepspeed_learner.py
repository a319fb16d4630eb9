"""Two DeepSpeed learner ranks (ZeRO-2, gloo, two processes) take the same step as the local runtime."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

from align import functional as F  # noqa: E402
from align.algorithms import PRESETS  # noqa: E402
from align.losses import PolicyInputs, StepNormalizer  # noqa: E402
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from align.objective import policy_step_loss  # noqa: E402
from align.trainers.protocols import SamplingParams  # noqa: E402
from align.trainers.rollout_hf import HFRolloutEngine  # noqa: E402
from align.trainers.sequences import response_forward  # noqa: E402

SPEC = PRESETS.get("dapo")


def _batch(model_dir: Path, inert: bool = False) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    tokenizer = build_char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    rollout = HFRolloutEngine(model, tokenizer).generate(["1+2=", "30+4=", "7+7=", "5+55="], {}, samples_per_prompt=4,
                                                         params=SamplingParams(max_new_tokens=5))
    rewards = torch.tensor([float(len(c) % 3) for c in rollout.completions])
    rewards[::4] += 1.0  # every group has reward spread
    if inert:  # groups 1-3 get one reward each: all their advantages are 0, and rank 1 (groups 2-3) has no other
        rewards[4:] = 1.0
    advantages = F.advantages("grpo", rewards=rewards, mask=rollout.mask, group_ids=rollout.group_ids)
    return {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "completion_ids": rollout.completion_ids, "mask": rollout.mask, "logp": rollout.logp,
            "advantages": advantages, "group_ids": rollout.group_ids}


def _rank(rank: int, port: int, model_dir: str, batch: dict, out: dict, optimizer: str, stage: int,
          inert: bool) -> None:
    from transformers import AutoModelForCausalLM

    from ray_jobs.learner_deepspeed import DeepSpeedLearner, LearnerConfig, shard_rows, take

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LearnerConfig(lr=1.0 if optimizer == "sgd" else 1e-3, max_grad_norm=1.0, optimizer=optimizer,
                           zero_stage=stage)
    learner = DeepSpeedLearner(model, SPEC, config, rank=rank, world_size=2, master_port=port)
    rows = shard_rows(batch["group_ids"], 2)[rank]
    stats = learner.step(take(batch, rows))
    assert stats["update/skipped_rows_frac"] == (0.0 if not inert else 0.5 if rank == 0 else 1.0)
    out[rank] = (stats["loss"], learner.parameters_snapshot())


@pytest.mark.parametrize(("optimizer", "stage", "inert"),
                         [("sgd", 2, False), ("adamw", 2, False), ("adamw", 3, False), ("sgd", 2, True)])
def test_two_zero_ranks_match_the_local_step(tmp_path: Path, optimizer: str, stage: int, inert: bool) -> None:
    """SGD with lr 1: the parameter change is minus the (clipped) gradient, so this compares gradients at 1e-5;
    AdamW: the whole optimiser step. ``inert``: groups with all-zero advantages are skipped by the ranks (one rank
    has nothing else) and the step still equals the local one over every row."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer), TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                                 intermediate_size=64, seed=4))
    model.save_pretrained(tmp_path)
    batch = _batch(tmp_path, inert)

    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(tmp_path)
    start = {n: p.detach().clone() for n, p in local.named_parameters()}
    step = (torch.optim.SGD(local.parameters(), lr=1.0) if optimizer == "sgd"
            else torch.optim.AdamW(local.parameters(), lr=1e-3, weight_decay=0.0))
    logp, entropy, _ = response_forward(local, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                        batch["mask"], with_entropy=True)
    inputs = PolicyInputs(logp=logp, old_logp=batch["logp"], advantages=batch["advantages"], mask=batch["mask"],
                          token_ids=batch["completion_ids"], group_ids=batch["group_ids"], entropy=entropy)
    loss, _ = policy_step_loss(SPEC, inputs, StepNormalizer.from_masks(batch["mask"]))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(local.parameters(), 1.0)
    step.step()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, str(tmp_path), batch, out, optimizer, stage, inert), nprocs=2, join=True)
    assert abs(out[0][0] + out[1][0] - float(loss)) < 1e-5  # the rank shares add up to the whole loss
    moved = 0.0
    for name, expected in local.named_parameters():
        moved = max(moved, float((expected.detach() - start[name]).abs().max()))
        for rank in (0, 1):
            torch.testing.assert_close(out[rank][1][name], expected.detach(), rtol=0, atol=1e-5)
    assert moved > 1e-4  # the step did something
