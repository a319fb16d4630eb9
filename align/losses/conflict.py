"""GTPO conflict-token weights (arXiv 2508.03772; official code ``winstonsmith1897/GTPO``; spec §5).

A *conflict token* appears at the same position in completions of the same group with opposite advantage signs.
GTPO amplifies it (weight ``conflict_weight``, 2 by default) in positive completions and removes it (weight 0) in
negative ones, so shared tokens such as format tags are never pushed down. Completions with A_i = 0 are neither
positive nor negative: their tokens never make a conflict and always get weight 1.

Modes:
* ``"prefix_suffix"`` (default, the official code): a position conflicts if its token id occurs at that position in
  >= 1 positive and >= 1 negative completion of the group; only the contiguous run from the first token counts
  (forward), and likewise the contiguous run ending at the last valid token, with completions aligned at their
  ends (backward). Forward and backward weights multiply, so a token in both runs gets ``conflict_weight**2``.
* ``"any_position"`` (the abstract's wording): every forward-aligned conflicting position counts, no contiguity,
  no backward pass.

Positions with mask 0 inside a row (tool output) are skipped: they neither conflict nor break a run.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from align.errors import InputError

ConflictMode = Literal["prefix_suffix", "any_position"]
CONFLICT_MODES: tuple[str, ...] = ("prefix_suffix", "any_position")


def _raw_conflicts(tokens: Tensor, valid: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """(G, T) bool: row i is signed and its token at t also occurs at t in a positive and a negative row."""
    same = (tokens.unsqueeze(1) == tokens.unsqueeze(0)) & valid.unsqueeze(1) & valid.unsqueeze(0)  # (G, G, T)
    in_positive = (same & positive.view(1, -1, 1)).any(1)  # (G, T)
    in_negative = (same & negative.view(1, -1, 1)).any(1)
    signed = (positive | negative).unsqueeze(-1)  # rows with A = 0 never hold conflict tokens
    return in_positive & in_negative & valid & signed


def _contiguous_run(raw: Tensor, valid: Tensor) -> Tensor:
    """Keep only the run of conflicts that starts at position 0; invalid positions are transparent."""
    passes = raw | ~valid
    return passes.long().cumprod(-1).bool() & valid


def _align_right(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Reverse each row so that its last valid position comes first: index s holds position last_i - s.

    Returns (gathered x (G, T), index (G, T) with -1 where s runs past the row start).
    """
    t = x.shape[-1]
    positions = torch.arange(t, device=x.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(-1).values  # (G,)
    index = last.unsqueeze(-1) - torch.arange(t, device=x.device).unsqueeze(0)  # (G, T)
    gathered = x.gather(-1, index.clamp(min=0))
    return gathered, index


def conflict_weights(
    token_ids: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    advantage_sign: Tensor,
    *,
    mode: ConflictMode = "prefix_suffix",
    conflict_weight: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Per-token GTPO weights lambda_{i,t} and the count of conflict tokens per completion.

    token_ids: (B, T) long; mask: (B, T); group_ids: (B,) int; advantage_sign: (B,) in {-1, 0, +1}.
    Returns (weights (B, T) float32, 0 off-mask; n_conflict (B,) long).
    """
    if mode not in CONFLICT_MODES:
        raise InputError(f"conflict_mode must be one of {', '.join(CONFLICT_MODES)}, got {mode!r}")
    if token_ids.shape != mask.shape:
        raise InputError(f"token_ids {tuple(token_ids.shape)} must match the mask {tuple(mask.shape)}")
    valid_all = mask != 0
    weights = valid_all.to(torch.float32)
    n_conflict = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    for gid in torch.unique(group_ids):  # groups are independent; each is vectorised over (G, G, T)
        rows = (group_ids == gid).nonzero().squeeze(-1)
        tokens, valid, sign = token_ids[rows], valid_all[rows], advantage_sign[rows]
        positive, negative = sign > 0, sign < 0
        if not (positive.any() and negative.any()):
            continue
        forward = _raw_conflicts(tokens, valid, positive, negative)
        if mode == "prefix_suffix":
            forward = _contiguous_run(forward, valid)
            rtokens, index = _align_right(tokens, valid)
            rvalid = valid.gather(-1, index.clamp(min=0)) & (index >= 0)
            backward_r = _contiguous_run(_raw_conflicts(rtokens, rvalid, positive, negative), rvalid)
            # Scatter back; positions past a row's start go to a spare slot T that is dropped.
            slot = torch.where(index >= 0, index, torch.full_like(index, tokens.shape[-1]))
            spare = torch.zeros(tokens.shape[0], tokens.shape[-1] + 1, dtype=torch.bool, device=tokens.device)
            backward = spare.scatter_(-1, slot, backward_r & rvalid)[:, :-1]
            factors = [forward, backward]
        else:
            factors = [forward]
        scale = torch.where(positive, conflict_weight, 0.0).to(torch.float32).unsqueeze(-1)  # (G, 1)
        w = valid.to(torch.float32)
        for conflicted in factors:
            w = w * torch.where(conflicted, scale, torch.ones_like(scale))
        weights[rows] = w
        n_conflict[rows] = torch.stack(factors).any(0).sum(-1)
    return weights, n_conflict
