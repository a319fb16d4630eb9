"""Numerical ops against plain references: values, gradients, and the memory the chunked ops keep for backward."""

from __future__ import annotations

import pytest
import torch

from align.errors import InputError
from align.ops import (
    as_float_mask,
    discounted_returns,
    entropy_from_logits,
    group_stats,
    kl_from_logits,
    last_token_mask,
    masked_mean,
    masked_whiten,
    selective_log_softmax,
)

from ..conftest import loop_returns


def logits_and_ids(seed: int = 0, shape: tuple[int, ...] = (3, 4), vocab: int = 11, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, vocab, shape, generator=gen)
    return logits, ids


@pytest.mark.parametrize("chunk_rows", [1, 5, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_log_softmax(chunk_rows: int | None, temperature: float) -> None:
    logits, ids = logits_and_ids()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = selective_log_softmax(a, ids, temperature=temperature, chunk_rows=chunk_rows)
    ref = torch.log_softmax(b / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-6)
    weights = torch.randn(ids.shape, dtype=torch.float64)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_selective_log_softmax_bf16_keeps_dtype_and_returns_fp32() -> None:
    logits, ids = logits_and_ids(dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    out = selective_log_softmax(x, ids, chunk_rows=2)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    ref = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_selective_log_softmax_rejects_bad_ids() -> None:
    logits, ids = logits_and_ids()
    with pytest.raises(InputError, match="token_ids must lie in"):
        selective_log_softmax(logits, ids + 100)
    with pytest.raises(InputError, match="must match logits"):
        selective_log_softmax(logits, ids[:, :2])


@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_entropy_matches_reference_and_gradient(chunk_rows: int | None) -> None:
    logits, _ = logits_and_ids(1)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = entropy_from_logits(a, chunk_rows=chunk_rows, temperature=0.9)
    p = torch.softmax(b / 0.9, -1)
    ref = -(p * torch.log_softmax(b / 0.9, -1)).sum(-1)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-6)
    weights = torch.randn(ours.shape, dtype=torch.float64)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_forward_kl_matches_reference_and_freezes_reference(chunk_rows: int | None) -> None:
    logits, _ = logits_and_ids(2)
    ref_logits, _ = logits_and_ids(3)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    frozen = ref_logits.clone().requires_grad_(True)
    ours = kl_from_logits(frozen, a, chunk_rows=chunk_rows)
    ref_logp = torch.log_softmax(ref_logits, -1)
    expected = (ref_logp.exp() * (ref_logp - torch.log_softmax(b, -1))).sum(-1)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-6)
    assert bool((ours >= -1e-7).all())
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)
    assert frozen.grad is None


def _extra_saved_bytes(fn, logits: torch.Tensor) -> int:
    """Bytes that autograd keeps for backward beyond the logits tensor itself."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(logits)
    own = logits.untyped_storage().data_ptr()
    seen, total = set(), 0
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr != own and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def test_chunked_ops_keep_no_vocabulary_sized_copy_for_backward() -> None:
    rows, vocab = 64, 4096
    logits = torch.randn(rows, vocab, dtype=torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, vocab, (rows,))
    per_row_budget = 16 * rows  # a few fp32/int64 scalars per row
    assert _extra_saved_bytes(lambda z: selective_log_softmax(z, ids, chunk_rows=8), logits) <= per_row_budget
    assert _extra_saved_bytes(lambda z: entropy_from_logits(z, chunk_rows=8), logits) <= per_row_budget
    # the naive way keeps a full fp32 (rows, vocab) copy: the thing the chunked ops avoid
    naive = _extra_saved_bytes(lambda z: torch.log_softmax(z.float(), -1).gather(-1, ids[:, None]), logits)
    assert naive >= rows * vocab * 4


def test_masked_mean_of_empty_mask_is_zero_not_nan() -> None:
    x = torch.tensor([[float("nan"), 1.0]])
    mask = torch.zeros(1, 2)
    assert masked_mean(x, mask).item() == 0.0
    assert masked_mean(x, torch.tensor([[0.0, 1.0]])).item() == 1.0  # NaN under the mask never leaks


def test_masked_whiten_population_and_bessel() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    pop = masked_whiten(x, mask, ddof=0, eps=0.0)
    torch.testing.assert_close(pop, torch.tensor([[-1.2247449, 0.0, 1.2247449, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-6)
    bessel = masked_whiten(x, mask, ddof=1, eps=0.0)
    torch.testing.assert_close(bessel, torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_skip_holes(gamma: float) -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]]).double()
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma=gamma), loop_returns(rewards, mask, gamma),
                               rtol=0, atol=1e-9)


def test_last_token_mask_uses_the_mask_not_the_padding() -> None:
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert last_token_mask(mask).int().tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_group_stats_match_a_loop() -> None:
    values = torch.tensor([1.0, 4.0, 2.0, 8.0, 3.0, 5.0], dtype=torch.float64)
    groups = torch.tensor([7, 3, 7, 3, 7, 11])
    stats = group_stats(values, groups, ddof=1)
    for i in range(len(values)):
        members = values[groups == groups[i]]
        assert stats.size[i] == len(members)
        assert abs(float(stats.mean[i]) - float(members.mean())) < 1e-12
        if len(members) > 1:
            assert abs(float(stats.std[i]) - float(members.std())) < 1e-12
        else:
            assert torch.isnan(stats.std[i])


def test_mask_validation() -> None:
    like = torch.zeros(2, 3)
    with pytest.raises(InputError, match="only 0 and 1"):
        as_float_mask(torch.full((2, 3), 0.5), like)
    with pytest.raises(InputError, match="must match"):
        as_float_mask(torch.ones(2, 4), like)
    assert as_float_mask(torch.ones(2, 3, dtype=torch.bool), like).dtype == torch.float32


@pytest.mark.parametrize("chunk_rows", [None, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_a_slice_match_the_naive_ops_without_copying_it(chunk_rows: int | None, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    full = torch.randn(3, 9, 11, dtype=torch.float64).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 11, (3, 6))
    sliced = full[:, 2:8]  # (3, 6, 11): not viewable as (18, 11)
    ours = selective_log_softmax(sliced, ids, temperature=0.7, chunk_rows=chunk_rows)
    ent = entropy_from_logits(sliced, temperature=0.7, chunk_rows=chunk_rows)
    (ours.sum() + ent.sum()).backward()
    grad_ours = full.grad.clone()
    full.grad = None
    ref_logp = torch.log_softmax(sliced.double() / 0.7, -1)
    ref = ref_logp.gather(-1, ids[..., None]).squeeze(-1)
    ref_ent = -(ref_logp.exp() * ref_logp).sum(-1)
    (ref.sum() + ref_ent.sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), ref_ent, atol=tol, rtol=tol)
    torch.testing.assert_close(grad_ours.double(), full.grad.double(), atol=tol, rtol=tol)
    assert grad_ours[:, :2].abs().max() == 0 and grad_ours[:, 8:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_written_into_the_logits_equals_the_usual_gradient(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    hidden = torch.randn(4, 7, 16)
    head = torch.randn(16, 13, dtype=torch.float32).requires_grad_(True)
    ids = torch.randint(0, 13, (4, 5))
    grads = []
    for in_place in (False, True):
        head.grad = None
        logits = (hidden @ head).to(dtype)  # (4, 7, 13), as an LM head would produce
        logp = selective_log_softmax(logits[:, 1:6], ids, temperature=0.9, chunk_rows=3, grad_in_logits=in_place)
        (logp * torch.linspace(-1, 1, 5)).sum().backward()
        grads.append(head.grad.clone())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grads[1], grads[0], atol=tol, rtol=tol)


def test_gradient_in_logits_fails_loudly_when_another_op_still_needs_the_logits() -> None:
    logits = (torch.randn(2, 5, 8) @ torch.randn(8, 8)).requires_grad_(True)
    ids = torch.randint(0, 8, (2, 5))
    other = (logits**2).sum()  # pow saves its input: the logits, which the in-place gradient overwrites
    logp = selective_log_softmax(logits, ids, grad_in_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + logp.sum()).backward()
