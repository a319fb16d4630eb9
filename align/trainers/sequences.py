"""Tokenisation, padding and the policy forward pass over prompt + completion sequences.

Prompts are left-padded and completions right-padded, so every response starts at column P. Position ids follow
the attention mask (as ``generate`` does), so a left-padded row gets the same log-probs as the unpadded one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from align.ops import entropy_from_logits, selective_log_softmax
from align.trainers.critic import ActorCriticOutput


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(B, P) ids and mask, left-padded."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    """(B, T) ids and float mask, right-padded."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), max(width, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), max(width, 1)), dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1.0
    return ids, mask


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens added."""
    out: list[list[int]] = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return out


def mask_after_eos(ids: Tensor, eos_id: int) -> Tensor:
    """(B, T) float mask: 1 up to and including the first EOS."""
    is_eos = (ids == eos_id).long()
    before = (is_eos.cumsum(-1) - is_eos) == 0
    return before.float()


@dataclass
class ResponseOutputs:
    """One forward pass over prompt + completion, at the completion's positions."""

    logp: Tensor  # (B, T) log-probs of the completion tokens
    entropy: Tensor | None  # (B, T) no grad, when asked for
    logits: Tensor | None  # (B, T, V) divided by the temperature, when asked for
    values: Tensor | None  # (B, T) critic values V(s_t) of the states that choose each token (an ActorCritic)


def response_forward(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    return_logits: bool = False,
    entropy_temperature: float | None = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probs (B, T) of the completion tokens, optionally their entropy (B, T, no grad) and logits (B, T, V).
    (:func:`response_outputs` also gives a critic's values; ``entropy_temperature`` is explained there.)"""
    out = response_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=temperature,
                           with_entropy=with_entropy, return_logits=return_logits,
                           entropy_temperature=entropy_temperature)
    return out.logp, out.entropy, out.logits


def response_outputs(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    return_logits: bool = False,
    entropy_temperature: float | None = 1.0,
    share_prompt: bool = False,
    agree: Callable[[Sequence[int]], list[int]] | None = None,
    unwrapped: Any = None,
) -> ResponseOutputs:
    """Log-probs (B, T) of the completion tokens, optionally their entropy (B, T, no grad) and logits (B, T, V),
    and the values (B, T) when ``model`` has a value head (:class:`~align.trainers.critic.ActorCritic`).
    ``share_prompt=True`` computes each run of identical prompt rows once and shares its KV cache with the run's
    completions (:func:`~align.trainers.shared_prefix.shared_prefix_outputs`): the same results up to rounding.
    With it, on several ranks, ``agree`` (the strategy's ``agree_min``) makes every rank share or not together, and
    ``unwrapped`` is the model inside a wrapper ``model`` such as the DeepSpeed engine (both unused unshared).

    Log-probs and returned logits are those of the sampling distribution softmax(z / ``temperature``). The entropy
    is H(softmax(z / ``entropy_temperature``)): by default 1.0, the model's own distribution from the raw logits,
    as GTPO's official code computes the entropy it filters on and subtracts (``winstonsmith1897/GTPO``,
    arXiv 2508.03772; spec §5); ``None`` takes it at the sampling ``temperature`` instead.

    Only the T + 1 last positions go through the LM head (``logits_to_keep``): prompt positions predict nothing
    we score, and for a large vocabulary their logits would dominate compute and memory. Unless the logits are
    returned, the log-prob backward writes its gradient into the logits' memory (nothing else reads them), so
    the logits and their gradient share one buffer.
    """
    if share_prompt:
        from align.trainers.shared_prefix import shared_prefix_outputs  # it imports this module

        return shared_prefix_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                     temperature=temperature, with_entropy=with_entropy, return_logits=return_logits,
                                     entropy_temperature=entropy_temperature, agree=agree, unwrapped=unwrapped)
    t = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask.long(), torch.ones_like(completion_ids)], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits, values = _last_outputs(model, input_ids, attention, positions, keep=t + 1)  # (B, >= T+1, V)
    predicting = logits[:, -(t + 1) : -1]  # (B, T, V): position p-1+s predicts completion token s
    if logits.shape[1] == t + 1 and not return_logits and logits.requires_grad:
        # Score all T+1 kept positions (the last one against a dummy id, then dropped) rather than the slice: the
        # backward of a slice would allocate a fresh logits-sized gradient, while this writes the gradient into
        # the logits' own memory (nothing reads them after the backward; the entropy below is taken before it).
        padded = torch.cat([completion_ids, completion_ids.new_zeros(completion_ids.shape[0], 1)], 1)
        logp = selective_log_softmax(logits, padded, temperature=temperature, grad_in_logits=True)[:, :t]
    else:
        logp = selective_log_softmax(predicting, completion_ids, temperature=temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(predicting.detach(), temperature=(
                temperature if entropy_temperature is None else entropy_temperature))
    return ResponseOutputs(logp=logp, entropy=entropy, logits=predicting / temperature if return_logits else None,
                           values=None if values is None else values[:, -(t + 1) : -1])


def _last_outputs(model: Any, input_ids: Tensor, attention: Tensor, positions: Tensor, *,
                  keep: int) -> tuple[Tensor, Tensor | None]:
    """Logits of the last ``keep`` positions (all positions for models whose forward has no ``logits_to_keep``),
    and the values of the same positions when the model has a value head."""
    try:
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep)
    except TypeError as err:
        if "logits_to_keep" not in str(err):
            raise
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions)
    # (a Hugging Face output is a dict, whose .values is the dict method: ask for the critic's output by type)
    return out.logits, out.values if isinstance(out, ActorCriticOutput) else None
