"""Micro-batches of whole groups, longest first, each trimmed to its own widest row: the same step as one
untrimmed pass (exact up to float summation order), with the padding it saved on record."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from align.algorithms import PRESETS
from align.losses import StepNormalizer
from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from align.trainers.batches import PolicyBatch
from align.trainers.learner import PolicyLearner
from align.trainers.optim import build_optimizer, build_scheduler
from align.trainers.sequences import pad_left
from align.trainers.strategy import TorchStrategy

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)
GROUPS, G, WIDTH = 4, 3, 9


def ragged_batch() -> PolicyBatch:
    """4 groups of 3 with prompts of 2-8 tokens and completions of 1-9, the long ones in the last group."""
    gen = torch.Generator().manual_seed(0)
    prompts = [list(range(5, 5 + n)) for n in (2, 8, 3, 5)]
    prompt_ids, prompt_mask = pad_left([p for p in prompts for _ in range(G)], 0)
    lengths = torch.tensor([1, 2, 2, 3, 1, 2, 2, 2, 1, 9, 4, 7])
    mask = (torch.arange(WIDTH) < lengths.unsqueeze(1)).float()
    mask[10, 1] = 0.0  # a hole (an observation) inside a row
    return PolicyBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=torch.randint(5, 60, (GROUPS * G, WIDTH), generator=gen), mask=mask,
                       logp=-torch.rand(GROUPS * G, WIDTH, generator=gen) * mask,
                       advantages=torch.randn(GROUPS * G, 1, generator=gen).expand(-1, WIDTH) * mask,
                       group_ids=torch.arange(GROUPS).repeat_interleave(G),
                       normalizer=StepNormalizer.from_masks(mask))


def step_gradients(micro_batch_size: int, trim: bool, monkeypatch) -> tuple[list[torch.Tensor], dict[str, float]]:
    if not trim:
        monkeypatch.setattr(PolicyBatch, "trimmed", lambda self: self)
    model = build_tiny_causal_lm(len(build_char_tokenizer()), SMALL).double()
    optimizer = build_optimizer(model, lr=0.0, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=1)
    learner = PolicyLearner(replace(PRESETS.get("dr_grpo"), kl=None, kl_coef=0.0),
                            TorchStrategy(model, optimizer, scheduler, max_grad_norm=None),
                            micro_batch_size=micro_batch_size)
    batch = ragged_batch()
    batch = replace(batch, logp=batch.logp.double(), advantages=batch.advantages.double())
    grads: list[torch.Tensor] = []
    original_step = optimizer.step

    def capture(*args, **kwargs):  # the gradient the optimiser is about to apply
        grads.extend(p.grad.detach().clone() for p in model.parameters() if p.grad is not None)
        return original_step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", capture)
    stats = learner.step(batch)
    monkeypatch.undo()
    return grads, stats


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_trimmed_sorted_micro_batches_take_the_untrimmed_step(monkeypatch) -> None:
    reference, whole = step_gradients(64, trim=False, monkeypatch=monkeypatch)
    grads, stats = step_gradients(3, trim=True, monkeypatch=monkeypatch)
    assert len(grads) == len(reference) > 0
    for a, b in zip(grads, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert stats["loss"] == whole["loss"] or abs(stats["loss"] - whole["loss"]) < 1e-10
    # one group per micro-batch, trimmed: most of the untrimmed padding is gone
    assert stats["update/padding_frac"] < 0.5 * stats["update/padding_frac_untrimmed"]


def test_trimmed_drops_only_columns_every_row_pads() -> None:
    batch = ragged_batch().take(torch.arange(0, 3))  # the first group: prompt of 2, completions of 1-2
    trimmed = batch.trimmed()
    assert trimmed.prompt_ids.shape[1] == 2 and trimmed.mask.shape[1] == 2
    assert torch.equal(trimmed.prompt_ids, batch.prompt_ids[:, -2:])
    assert torch.equal(trimmed.mask, batch.mask[:, :2]) and trimmed.mask.sum() == batch.mask.sum()
    holes = ragged_batch().take(torch.arange(9, 12)).trimmed()  # the hole at column 1 of a 4-token row stays
    assert holes.mask.shape[1] == 9 and holes.mask[1, 1] == 0
