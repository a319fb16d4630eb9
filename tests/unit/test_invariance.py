"""Splitting one optimiser step into micro-batches or data-parallel ranks never changes the loss or gradient.

Covers the whole matrix: every registered policy loss x every reducer, plus the presets (with their KL terms).
Micro-batches are re-padded to their own width, as dynamic padding does.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from align import functional as F
from align.algorithms import PRESETS, AlgorithmSpec
from align.losses import POLICY_LOSSES, REDUCERS, PolicyInputs, StepNormalizer
from align.objective import policy_step_loss

from ..conftest import random_batch

POLICY_PRESETS = [n for n in PRESETS.names() if PRESETS.get(n).kind == "policy"]


def batch_for(loss_name: str, seed: int = 21) -> dict:
    b = random_batch(seed, groups=4, group_size=3, width=6)
    b["rewards"] = b["rewards"] + 0.25 * torch.arange(12, dtype=torch.float64) % 1.0
    estimator = "dr_grpo" if loss_name == "gtpo" else "grpo"
    b["advantages"] = F.advantages(estimator, rewards=b["rewards"], mask=b["mask"], group_ids=b["group_ids"])
    b["entropy"] = b["entropy"] * 0.5
    return b


def spec_for(loss_name: str, reducer: str) -> AlgorithmSpec:
    advantage = "dr_grpo" if loss_name == "gtpo" else "grpo"
    return AlgorithmSpec(name=f"{loss_name}/{reducer}", advantage=advantage, policy_loss=loss_name, reducer=reducer,
                         loss_kwargs={"eps_low": 0.05, "eps_high": 0.1} if loss_name in ("gspo", "gspo_token") else {})


def shard(b: dict, rows: list[int]) -> tuple[PolicyInputs, torch.Tensor]:
    """Rows of the batch, trimmed to their own padded width."""
    idx = torch.tensor(rows)
    used_columns = (b["mask"][idx] != 0).any(0).nonzero()
    width = int(used_columns.max()) + 1 if used_columns.numel() else 1
    cut = slice(0, width)
    inputs = PolicyInputs(
        logp=b["logp_param"][idx][:, cut], old_logp=b["old_logp"][idx][:, cut], advantages=b["advantages"][idx][:, cut],
        mask=b["mask"][idx][:, cut], token_ids=b["token_ids"][idx][:, cut], group_ids=b["group_ids"][idx],
        entropy=b["entropy"][idx][:, cut],
    )
    return inputs, b["ref_logp"][idx][:, cut]


def whole_and_split(spec: AlgorithmSpec, b: dict, parts: list[list[int]], per_rank_norm: bool):
    results = []
    for split in (None, parts):
        logp = b["logp"].clone().requires_grad_(True)
        b["logp_param"] = logp
        shards = [shard(b, list(range(12)))] if split is None else [shard(b, rows) for rows in split]
        if per_rank_norm and split is not None:  # each rank counts its own rows, then the counts are reduced
            norm = StepNormalizer.combine(StepNormalizer.from_masks(x.mask) for x, _ in shards)
        else:
            norm = StepNormalizer.from_masks([x.mask for x, _ in shards])
        total = sum(policy_step_loss(spec, x, norm, ref_logp=ref)[0] for x, ref in shards)
        total.backward()
        results.append((total.detach(), logp.grad.clone()))
    return results


# groups are kept whole in every split (GTPO's conflict weights need the group): 4 groups of 3 rows
MICRO_BATCHES = [[0, 1, 2], [3, 4, 5, 6, 7, 8], [9, 10, 11]]
RANKS = [[0, 1, 2, 9, 10, 11], [3, 4, 5, 6, 7, 8]]


@pytest.mark.parametrize("reducer", REDUCERS.names())
@pytest.mark.parametrize("loss_name", POLICY_LOSSES.names())
@pytest.mark.parametrize(("parts", "per_rank"), [(MICRO_BATCHES, False), (RANKS, True)], ids=["micro", "ranks"])
def test_split_equals_whole_for_every_loss_and_reducer(loss_name: str, reducer: str, parts, per_rank) -> None:
    if loss_name == "gspo" and reducer != "seq_mean_token_mean":
        pytest.skip("refused by the compatibility check (covered in test_algorithms)")
    b = batch_for(loss_name)
    (whole, g_whole), (split, g_split) = whole_and_split(spec_for(loss_name, reducer), b, parts, per_rank)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-12)
    assert g_whole.abs().sum() > 0


@pytest.mark.parametrize("preset", POLICY_PRESETS)
def test_split_equals_whole_for_every_preset(preset: str) -> None:
    spec = PRESETS.get(preset)
    b = batch_for(spec.policy_loss or "")
    (whole, g_whole), (split, g_split) = whole_and_split(spec, b, MICRO_BATCHES, per_rank_norm=False)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-12)


def test_combined_rank_counts_equal_whole_step_counts() -> None:
    b = batch_for("ppo_clip")
    whole = StepNormalizer.from_masks(b["mask"], generation_budget=None)
    ranks = StepNormalizer.combine(StepNormalizer.from_masks(b["mask"][torch.tensor(r)]) for r in RANKS)
    assert ranks == whole


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        b = batch_for("ppo_clip")
        logp = b["logp"].clone().requires_grad_(True)
        b["logp_param"] = logp
        x, ref = shard(b, RANKS[rank])
        norm = StepNormalizer.from_masks(x.mask).all_reduce()
        loss, _ = policy_step_loss(PRESETS.get("dapo"), x, norm, ref_logp=ref)
        loss.backward()
        grad = logp.grad.clone()
        dist.all_reduce(grad)  # what DDP does: sum of the ranks' gradients
        total = loss.detach().clone()
        dist.all_reduce(total)
        out[rank] = (float(total), grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_two_rank_all_reduce_equals_whole_batch() -> None:
    out = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(_free_port(), out), nprocs=2, join=True)
    b = batch_for("ppo_clip")
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = F.policy_objective("dapo", logp=logp, old_logp=b["old_logp"], advantages=b["advantages"],
                                 mask=b["mask"])
    loss.backward()
    for rank in (0, 1):
        total, grad = out[rank]
        assert total == pytest.approx(loss.item(), abs=1e-12)
        torch.testing.assert_close(grad, logp.grad, rtol=0, atol=1e-12)


# --- any partition of the rows, drawn by hypothesis ------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=12, max_size=12), preset=st.sampled_from(["dapo", "grpo",
                                                                                             "dr_grpo", "rloo"]))
def test_any_row_partition_equals_whole(labels: list[int], preset: str) -> None:
    parts = [[i for i, lab in enumerate(labels) if lab == k] for k in range(4)]
    parts = [p for p in parts if p]
    b = batch_for("ppo_clip")
    (whole, g_whole), (split, g_split) = whole_and_split(PRESETS.get(preset), b, parts, per_rank_norm=True)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-12)
