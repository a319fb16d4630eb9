"""Numerical building blocks: masked statistics, group statistics, returns, and memory-frugal log-softmax ops.

The vocabulary-sized ops (``selective_log_softmax``, ``entropy_from_logits``, ``kl_from_logits``) are custom
autograd functions that walk the rows in chunks, both forward and backward, and save only the logits the caller
already holds plus one float per row. They therefore never keep a (B, T, V) float32 copy alive: extra memory grows
with B*T plus one chunk of rows, not with B*T*V. (A plain ``log_softmax(logits.float())`` keeps a full fp32 copy
for backward, which for bf16 logits triples the logits' footprint.)

Shapes: see :mod:`align.types`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from align.errors import InputError

# Rows per chunk are chosen so that one fp32 chunk holds about this many elements (16 MiB): below glibc's largest
# mmap threshold (32 MiB), so chunk buffers are recycled from the heap instead of being mapped and page-faulted
# afresh every iteration (measured: 64 MiB chunks took 1.3-1.5x as long, bench/memory_logprobs.py).
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------
def as_float_mask(mask: Tensor, like: Tensor, *, name: str = "mask") -> Tensor:
    """Return ``mask`` as a 0/1 tensor of ``like``'s floating dtype, after checking its shape and values.

    mask: (B, T) bool, int or float with values in {0, 1}; like: (B, T). Returns (B, T) float.
    """
    if mask.shape != like.shape:
        raise InputError(f"{name} has shape {tuple(mask.shape)} but the log-probs have {tuple(like.shape)}; "
                         "they must match (B, T)")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError(f"{name} must hold only 0 and 1 (1 = trainable token); found other values")
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(dtype)


def check_finite(name: str, x: Tensor, mask: Tensor | None = None) -> None:
    """Raise a one-line :class:`InputError` if ``x`` holds NaN or inf where ``mask`` is 1 (everywhere if None)."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & (mask.expand_as(x) != 0) if mask.dim() == x.dim() else bad & (mask != 0)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise InputError(f"{name} holds {int(bad.sum())} non-finite value(s) where the mask is 1 (first at "
                         f"index {where}); fix the upstream computation instead of training on NaN/inf")


def check_same_shape(reference_name: str, reference: Tensor, **others: Tensor | None) -> None:
    """Raise if any of ``others`` (ignoring None) differs in shape from ``reference``."""
    for name, t in others.items():
        if t is not None and t.shape != reference.shape:
            raise InputError(f"{name} has shape {tuple(t.shape)} but {reference_name} has "
                             f"{tuple(reference.shape)}; every per-token tensor must be (B, T)")


# --------------------------------------------------------------------------------------------------------------
# Masked statistics. ``where`` (not multiplication) zeroes masked entries so NaN/inf padding cannot leak.
# --------------------------------------------------------------------------------------------------------------
def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is 1, exactly 0 elsewhere (gradient 0 there too). x, mask: same shape."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over entries with mask 1, over ``dim`` (all dims if None)."""
    filled = masked_fill_zero(x, mask)
    return filled.sum() if dim is None else filled.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries with mask 1; 0 where nothing is unmasked (never NaN)."""
    count = (mask != 0).sum() if dim is None else (mask != 0).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, *, ddof: int = 1) -> Tensor:
    """Variance of the entries of x with mask 1 (scalar), with ``ddof`` degrees of freedom removed."""
    count = (mask != 0).sum().to(x.dtype)
    mean = masked_sum(x, mask) / count.clamp(min=1)
    sq = masked_sum((x - mean) ** 2, mask)
    return sq / (count - ddof).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, *, ddof: int = 1, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + eps) over entries with mask 1; masked entries are 0. x, mask: (B, T)."""
    count = (mask != 0).sum().to(x.dtype)
    mean = masked_sum(x, mask) / count.clamp(min=1)
    var = masked_var(x, mask, ddof=ddof)
    out = (x - mean) if shift_mean else x
    return masked_fill_zero(out * torch.rsqrt(var + eps), mask)


def sequence_lengths(mask: Tensor) -> Tensor:
    """L_i = number of trainable tokens per row. mask: (B, T) -> (B,) of mask's float dtype (or float32)."""
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    return (mask != 0).sum(-1).to(dtype)


def last_token_mask(mask: Tensor) -> Tensor:
    """(B, T) bool, True only at the last trainable token of each row (found from the mask, not the padding)."""
    valid = mask != 0
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(-1).values  # (B,)
    return (positions == last.unsqueeze(-1)) & valid


def broadcast_to_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """Spread one value per row over its trainable tokens. values: (B,), mask: (B, T) -> (B, T), 0 off-mask."""
    return masked_fill_zero(values.unsqueeze(-1).expand(mask.shape), mask)


def discounted_returns(rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """Reward-to-go G_t = sum_{s >= t} gamma^(k_s - k_t) r_s over trainable tokens only.

    Discounting counts trainable tokens (k = index among the row's trainable tokens), so holes in the mask
    (tool output, padding) neither receive credit nor add discount steps. rewards, mask: (B, T) -> (B, T).
    """
    filled = masked_fill_zero(rewards, mask)
    if gamma == 1.0:
        out = filled.flip(-1).cumsum(-1).flip(-1)
        return masked_fill_zero(out, mask)
    out = torch.zeros_like(filled)
    running = torch.zeros_like(filled[..., 0])
    valid = mask != 0
    for t in range(filled.shape[-1] - 1, -1, -1):  # (B,) per step; T python steps, vectorised over B.
        running = torch.where(valid[..., t], filled[..., t] + gamma * running, running)
        out[..., t] = running
    return masked_fill_zero(out, mask)


# --------------------------------------------------------------------------------------------------------------
# Group statistics
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupStats:
    """Per-row statistics of the row's group. Every field is (B,)."""

    mean: Tensor  # equal to the rows' value, bit for bit, when every row of the group is equal
    std: Tensor  # NaN where the group has <= ddof members; exactly 0 for equal rows
    size: Tensor  # long
    uniform: Tensor  # bool: every row of the group has the same value


def group_stats(values: Tensor, group_ids: Tensor, *, ddof: int = 1) -> GroupStats:
    """Mean, std (``ddof`` removed) and size of each row's group. values: (B,) float; group_ids: (B,) int."""
    if group_ids.shape != values.shape[:1] or values.dim() != 1:
        raise InputError(f"group_ids must be (B,) = {tuple(values.shape[:1])} matching the per-row values, got "
                         f"{tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise InputError(f"group_ids must be an integer tensor (one id per prompt), got {group_ids.dtype}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    size = torch.bincount(inverse, minlength=n_groups)
    exact = values.to(torch.float64)  # accumulate in float64, return in the values' dtype
    sums = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(0, inverse, exact)
    mean = sums / size.to(torch.float64)
    high = torch.full_like(sums, -torch.inf).scatter_reduce_(0, inverse, exact, "amax")
    low = torch.full_like(sums, torch.inf).scatter_reduce_(0, inverse, exact, "amin")
    uniform = high == low
    # (G - 1) equal non-dyadic values do not average back to themselves in floating point; a group with no
    # spread must give advantage 0 exactly (spec §1), not a rounding residue
    mean = torch.where(uniform, high, mean)
    sq = torch.zeros_like(sums).index_add_(0, inverse, (exact - mean[inverse]) ** 2)
    denom = (size - ddof).to(torch.float64)
    std = torch.where(denom > 0, (sq / denom.clamp(min=1)).sqrt(), torch.full_like(sq, float("nan")))
    std = torch.where(uniform & (denom > 0), torch.zeros_like(std), std)
    return GroupStats(mean=mean[inverse].to(values.dtype), std=std[inverse].to(values.dtype), size=size[inverse],
                      uniform=uniform[inverse])


# --------------------------------------------------------------------------------------------------------------
# Vocabulary-sized ops, chunked over rows in forward and backward
# --------------------------------------------------------------------------------------------------------------
def _compute_dtype(logits: Tensor) -> torch.dtype:
    """fp32 for half-precision logits, the logits' own dtype for fp32/fp64."""
    return torch.promote_types(logits.dtype, torch.float32)


def _rows_per_chunk(vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _as_3d(x: Tensor) -> Tensor:
    """(..., V) -> (B, T, V) as a view when possible. Slices such as ``logits[:, p - 1 : -1]`` cannot be flattened
    to (B*T, V) without a copy, but each of their B slabs is row-contiguous: the ops walk them slab by slab."""
    vocab = x.shape[-1]
    if x.dim() < 2:
        raise InputError(f"expected (..., V) logits with at least 2 dims, got shape {tuple(x.shape)}")
    try:
        return x.view(1, -1, vocab)
    except RuntimeError:
        return x if x.dim() == 3 else x.reshape(-1, x.shape[-2], vocab)


def _blocks(batch: int, rows: int, chunk: int) -> list[tuple[slice, slice]]:
    """(batch slice, row slice) blocks of at most ``chunk`` rows that cover a (batch, rows) grid."""
    if rows >= chunk:
        return [(slice(b, b + 1), slice(t, t + chunk)) for b in range(batch) for t in range(0, rows, chunk)]
    per = max(1, chunk // max(rows, 1))
    return [(slice(b, b + per), slice(None)) for b in range(0, batch, per)]


def _scaled(block: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """A block of logits in the compute dtype, divided by the temperature (no copy when neither changes it)."""
    z = block.to(dtype)
    return z if temperature == 1.0 else z / temperature


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, ids: Tensor, temperature: float, chunk: int, grad_in_logits: bool
                ) -> Tensor:
        dtype = _compute_dtype(logits)
        out = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)  # (B, T)
        lse = torch.empty_like(out)
        for b, t in _blocks(logits.shape[0], logits.shape[1], chunk):
            z = _scaled(logits[b, t], dtype, temperature)  # (b, t, V), freed each iteration
            lse[b, t] = torch.logsumexp(z, dim=-1)
            out[b, t] = z.gather(-1, ids[b, t, None]).squeeze(-1) - lse[b, t]
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature, ctx.chunk, ctx.dtype, ctx.grad_in_logits = temperature, chunk, dtype, grad_in_logits
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None, None]:
        logits, ids, lse = ctx.saved_tensors
        # grad_in_logits: the gradient overwrites the logits block by block (each block is read before it is
        # written), so no second logits-sized buffer exists. Autograd's version counter makes any other user of
        # these logits fail loudly instead of reading gradients.
        grad = logits if ctx.grad_in_logits else torch.empty_like(logits)
        direct = grad.dtype == ctx.dtype  # fp32 logits: each block is computed straight into the gradient
        for b, t in _blocks(logits.shape[0], logits.shape[1], ctx.chunk):
            z = _scaled(logits[b, t], ctx.dtype, ctx.temperature)
            g = grad_out[b, t, None].to(ctx.dtype)  # (b, t, 1)
            target = grad[b, t] if direct else torch.empty_like(z)
            # d logp / d z = onehot - softmax, times the incoming gradient, over the temperature
            torch.sub(z, lse[b, t, None], out=target)
            target.exp_().mul_(-g)
            target.scatter_add_(-1, ids[b, t, None], g)
            if ctx.temperature != 1.0:
                target.div_(ctx.temperature)
            if not direct:
                grad[b, t] = target
        return grad, None, None, None, None


def selective_log_softmax(
    logits: Tensor, token_ids: Tensor, *, temperature: float = 1.0, chunk_rows: int | None = None,
    grad_in_logits: bool = False,
) -> Tensor:
    """log softmax(logits / temperature)[token_id] for every position, in fp32 or better, chunked over rows.

    logits: (..., V) any float dtype, any strides with contiguous rows (a slice ``logits[:, a:b]`` is not copied);
    token_ids: (...) long. Returns (...) in fp32 (fp64 for fp64 logits). Differentiable in ``logits``; the backward
    recomputes each chunk's softmax instead of storing it. ``grad_in_logits=True`` writes the gradient into the
    logits' own memory (for callers that never read the logits after the backward, e.g. a policy forward whose
    logits only feed this op): the backward then needs no logits-sized buffer of its own.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise InputError(f"token_ids {tuple(token_ids.shape)} must match logits without the vocabulary dim "
                         f"{tuple(logits.shape[:-1])}")
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    blocks = _as_3d(logits)
    ids = token_ids.reshape(blocks.shape[:-1]).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"token_ids must lie in [0, {vocab}); found {int(ids.min())}..{int(ids.max())}")
    out: Tensor = _SelectiveLogSoftmax.apply(blocks, ids, float(temperature), _rows_per_chunk(vocab, chunk_rows),
                                             bool(grad_in_logits))
    return out.reshape(token_ids.shape)


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, temperature: float, chunk: int) -> Tensor:
        dtype = _compute_dtype(logits)
        ent = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
        lse = torch.empty_like(ent)
        for b, t in _blocks(logits.shape[0], logits.shape[1], chunk):
            z = _scaled(logits[b, t], dtype, temperature)
            lse[b, t] = torch.logsumexp(z, dim=-1)
            p = (z - lse[b, t, None]).exp_()
            ent[b, t] = lse[b, t] - p.mul_(z).sum(-1)  # H = lse - E_p[z]
        ctx.save_for_backward(logits, lse, ent)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return ent

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, ent = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for b, t in _blocks(logits.shape[0], logits.shape[1], ctx.chunk):
            z = _scaled(logits[b, t], ctx.dtype, ctx.temperature)
            logp = z - lse[b, t, None]
            # dH/dz_j = -p_j (log p_j + H)
            chunk_grad = -logp.exp() * (logp + ent[b, t, None]) * grad_out[b, t, None]
            grad[b, t] = chunk_grad / ctx.temperature
        return grad, None, None


def entropy_from_logits(logits: Tensor, *, temperature: float = 1.0, chunk_rows: int | None = None) -> Tensor:
    """Full-vocabulary entropy H(softmax(logits / temperature)) per position, fp32, chunked over rows.

    logits: (..., V) -> (...) in fp32 (fp64 for fp64 logits); slices are not copied. Differentiable (for entropy
    bonuses); wrap in ``torch.no_grad()`` for diagnostics and GTPO's entropy filter.
    """
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    out: Tensor = _Entropy.apply(_as_3d(logits), float(temperature), _rows_per_chunk(vocab, chunk_rows))
    return out.reshape(logits.shape[:-1])


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ref_logits: Tensor, logits: Tensor, chunk: int) -> Tensor:
        dtype = _compute_dtype(logits)
        kl = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
        for b, t in _blocks(logits.shape[0], logits.shape[1], chunk):
            ref_logp = torch.log_softmax(ref_logits[b, t].to(dtype), dim=-1)
            logp = torch.log_softmax(logits[b, t].to(dtype), dim=-1)
            kl[b, t] = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        ctx.save_for_backward(ref_logits, logits)
        ctx.chunk, ctx.dtype = chunk, dtype
        return kl

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:
        ref_logits, logits = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for b, t in _blocks(logits.shape[0], logits.shape[1], ctx.chunk):
            p_ref = torch.softmax(ref_logits[b, t].to(ctx.dtype), dim=-1)
            p = torch.softmax(logits[b, t].to(ctx.dtype), dim=-1)
            grad[b, t] = (p - p_ref) * grad_out[b, t, None]  # d KL(ref||p) / d z
        return None, grad, None


def kl_from_logits(ref_logits: Tensor, logits: Tensor, *, chunk_rows: int | None = None) -> Tensor:
    """Forward KL(pi_ref(.|s_t) || pi_theta(.|s_t)) over the full vocabulary at each position, chunked.

    ref_logits, logits: (..., V) -> (...) in fp32 (fp64 for fp64 logits). Differentiable in ``logits`` only: the
    reference is frozen, so ``ref_logits`` is treated as a constant even if it requires grad (TDPO's SeqKL,
    arXiv 2404.11999 eq. 17).
    """
    if ref_logits.shape != logits.shape:
        raise InputError(f"reference logits {tuple(ref_logits.shape)} and policy logits {tuple(logits.shape)} "
                         "must have the same (..., V) shape")
    vocab = logits.shape[-1]
    ref3, pol3 = _as_3d(ref_logits), _as_3d(logits)
    if ref3.shape != pol3.shape:  # one of them was viewable as a single slab, the other not
        ref3, pol3 = ref_logits.reshape(-1, vocab)[None], logits.reshape(-1, vocab)[None]
    out: Tensor = _ForwardKL.apply(ref3, pol3, _rows_per_chunk(vocab, chunk_rows))
    return out.reshape(logits.shape[:-1])
