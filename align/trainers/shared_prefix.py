"""The policy forward with each distinct prompt computed once: a group's G completions share their prompt's KV cache.

In GRPO-style batches the G rows of a group carry the same prompt, and
:func:`~align.trainers.sequences.response_outputs` runs it G times. :func:`shared_prefix_outputs` runs every run of
identical consecutive prompt rows once (U prompts, ``use_cache=True``, the LM head on the last prompt position only),
gathers its KV cache onto the run's rows, and runs the completions on top of it. The gather is an indexing op, so the
backward sums each row's gradient into the one shared prefix: log-probs, entropy, logits, values and every parameter
gradient equal the unshared forward's up to floating-point rounding (summation order), not approximately.

Why it is exact: attention is causal, so a prompt position's keys and values never depend on what follows it, and
the rows of a run have identical prompt ids and masks, so the prefix they would each compute is the same tensor.
Completion positions attend to the cached prompt (pads masked as before) and to earlier completion positions; their
position ids continue from each prompt's length, as ``cumsum(attention) - 1`` gives in the unshared forward. The
first completion token is predicted by the last prompt position (left padding puts every prompt's last token in
column P - 1), the others by completion positions 0..T-2; the last completion token is never an input, since it
predicts nothing that is scored.

Groups are found from the rows themselves (:func:`prompt_runs`), not from ``group_ids``: a batch whose group's
rows differ is still right, and two consecutive groups with the same prompt share one prefix.

It falls back to the unshared forward (same results, no saving) when sharing is impossible or pointless:
every prompt row distinct; no prompt or completion columns, or an empty prompt row; a model in training mode with
active dropout (one dropout mask would be shared by the group's prefix, which the unshared forward draws per row),
or with gradient checkpointing on (transformers then drops the cache); ``transformers`` not importable; a cache
whose layers are not plain full-attention ``DynamicLayer`` s (sliding-window, linear-attention, hybrid models); and,
with a warning, a model whose forward refuses ``past_key_values``/``use_cache`` or leaves the cache unfilled.
An :class:`~align.trainers.critic.ActorCritic` is supported: its forward passes the cache through to the policy, and
its values come from the same hidden states (the last prompt position's and the completion positions').

On several ranks (a DeepSpeed learner) ``agree`` (the strategy's ``agree_min``) makes every rank take the same path:
ZeRO-3 gathers the partitioned weights collectively in every module's forward, so ranks must run as many model
calls in the same order, while whether a rank's rows can share depends on those rows (a stand-in row, distinct
prompts, a one-token completion width). Each rank proposes its path, and all share only when all propose the same
one; otherwise all run unshared. ``model`` may be a wrapper such as the DeepSpeed engine, whose ``config`` is its own:
``unwrapped`` (the engine's module) is read for the config and mode, and takes the completion pass, while the prompt
pass goes through ``model``, so the engine's forward (its backward hooks, set up once per forward it runs) wraps one
call per micro-batch, as in the unshared forward. ZeRO-3's gathering hooks sit on the module and its submodules, so
they fire for both calls.

Shapes: B rows, U distinct prompts (runs), P prompt columns, T completion columns, V vocabulary.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from align.ops import entropy_from_logits, selective_log_softmax
from align.trainers.critic import ActorCriticOutput, policy_of
from align.trainers.sequences import ResponseOutputs, response_outputs


@dataclass(frozen=True)
class PromptRuns:
    """Runs of identical consecutive prompt rows (ids and mask)."""

    firsts: Tensor  # (U,) long: the first row of each run
    row_run: Tensor  # (B,) long: the run each row belongs to, non-decreasing

    @property
    def count(self) -> int:
        return int(self.firsts.shape[0])


def prompt_runs(prompt_ids: Tensor, prompt_mask: Tensor) -> PromptRuns:
    """Runs of consecutive rows whose prompt ids and mask (B, P) are identical, pads included."""
    b = prompt_ids.shape[0]
    same = torch.ones(0, dtype=torch.bool, device=prompt_ids.device)
    if b > 1:
        same = ((prompt_ids[1:] == prompt_ids[:-1]).all(-1)
                & (prompt_mask[1:] == prompt_mask[:-1]).all(-1))  # (B-1,) row i+1 repeats row i
    starts = torch.cat([torch.ones(min(b, 1), dtype=torch.bool, device=prompt_ids.device), ~same])  # (B,)
    return PromptRuns(firsts=starts.nonzero().squeeze(1), row_run=starts.long().cumsum(0) - 1)


def shared_prefix_outputs(
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
    agree: Callable[[Sequence[int]], list[int]] | None = None,
    unwrapped: Any = None,
) -> ResponseOutputs:
    """:func:`~align.trainers.sequences.response_outputs` (same arguments, same results) with each run of identical
    prompt rows computed once.

    prompt_ids, prompt_mask: (B, P) left-padded; completion_ids: (B, T), completion_mask: (B, T) right-padded (the
    mask is not read: pads are scored and masked by the caller, as in ``response_outputs``). Returns logp (B, T),
    entropy (B, T) no grad when asked, logits (B, T, V) / temperature when asked, values (B, T) for an ActorCritic.
    ``agree``: the element-wise minimum over ranks of a list of ints (``Strategy.agree_min``), called once per call
    of this function on every rank; None in one process. ``unwrapped``: the model inside a wrapper ``model`` (the
    DeepSpeed engine's module); None: ``model`` itself.
    """
    options: dict[str, Any] = dict(temperature=temperature, with_entropy=with_entropy, return_logits=return_logits,
                                   entropy_temperature=entropy_temperature)
    inner = model if unwrapped is None else unwrapped
    runs = prompt_runs(prompt_ids, prompt_mask)
    cache = None if _static_reason(inner, prompt_mask, completion_ids, runs) else _new_cache(inner)
    if agree is not None:
        cache = _agreed(agree, cache, completion_ids.shape[1])
    out = None if cache is None else _shared(model, inner, prompt_ids, prompt_mask, completion_ids, runs, cache,
                                             **options)
    if out is None:
        return response_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **options)
    return out


def _agreed(agree: Callable[[Sequence[int]], list[int]], cache: Any, width: int) -> Any:
    """``cache`` when every rank proposes this rank's path through the model, else None: every rank runs unshared.

    A path is what the model is called with, in order: 0 unshared (prompt + completion, one call), 1 shared with
    completions of one token (the prompts alone), 2 shared (the prompts, then the completions). Ranks whose paths
    differ would call the model differently, so they agree only on a path they all propose."""
    path = 0 if cache is None else 1 if width == 1 else 2
    lowest, minus_highest = agree([path, -path])  # one collective for the minimum and the maximum
    return cache if lowest == -minus_highest else None


_REFUSED: weakref.WeakSet[Any] = weakref.WeakSet()  # models whose forward refused or ignored the cache


def _weakly_held(model: Any) -> bool:
    try:
        weakref.ref(model)
    except TypeError:
        return False
    return True


def _static_reason(model: Any, prompt_mask: Tensor, completion_ids: Tensor, runs: PromptRuns) -> str | None:
    """Why this batch and model are run unshared, found before any forward (None: share)."""
    if runs.count == prompt_mask.shape[0]:
        return "every prompt row is distinct"
    if prompt_mask.shape[1] == 0 or completion_ids.shape[1] == 0 or bool((prompt_mask.sum(-1) == 0).any()):
        return "an empty prompt or no completion"
    config = getattr(policy_of(model), "config", None)
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) in ("dynamic", "longrope"):
        # these pick their frequencies from the longest position of each call: a prompt pass alone would rotate the
        # prompt's keys differently from the whole sequence's
        return "the model's RoPE scaling depends on each call's length"
    if _weakly_held(model) and model in _REFUSED:
        return "the model refused or ignored the KV cache before"
    if isinstance(model, nn.Module) and model.training:
        if (any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
                or float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0):
            return "dropout is active: the unshared forward draws a mask per row"
        if getattr(policy_of(model), "is_gradient_checkpointing", False):
            return "gradient checkpointing drops the KV cache"
    return None


def _new_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` for the policy's config whose layers are all plain full attention, else None."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    config = getattr(policy_of(model), "config", None)
    try:
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
    except Exception:  # a config the cache cannot read: run unshared rather than guess
        return None
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window, linear-attention or hybrid layers: not shared
    return cache


def _shared(model: Any, inner: Any, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
            runs: PromptRuns, cache: Any, *, temperature: float, with_entropy: bool, return_logits: bool,
            entropy_temperature: float | None) -> ResponseOutputs | None:
    """The shared forward: the prompts through ``model``, the completions through ``inner`` (the same model, or the
    module a wrapper ``model`` runs); None when the model refused or ignored the cache."""
    p, t = prompt_ids.shape[1], completion_ids.shape[1]
    mask = prompt_mask[runs.firsts].long()  # (U, P)
    head = _forward(model, 1, input_ids=prompt_ids[runs.firsts], attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache, use_cache=True)
    if head is None or cache.get_seq_length() != p:
        if _weakly_held(inner):  # later calls go straight to the unshared forward, without a wasted prompt pass
            _REFUSED.add(inner)
        warnings.warn("shared_prefix_outputs: the model refused or ignored the KV cache; running every prompt "
                      "unshared", RuntimeWarning, stacklevel=3)
        return None
    first_logits = head[0][:, -1][runs.row_run]  # (B, V): the last prompt position predicts completion token 0
    first_values = None if head[1] is None else head[1][:, -1][runs.row_run]  # (B,)
    cache.batch_select_indices(runs.row_run)  # per layer (U, H, P, D) -> (B, H, P, D); the backward sums a run
    rest_logits, rest_values, whole = None, None, False
    if t > 1:  # completion positions 0..T-2 predict tokens 1..T-1
        lengths = mask.sum(-1)[runs.row_run]  # (B,)
        steps = torch.arange(t - 1, device=completion_ids.device)
        attention = torch.cat([prompt_mask.long(), torch.ones_like(completion_ids[:, 1:])], 1)  # (B, P + T - 1)
        # through the wrapped module: a wrapper's forward runs once per micro-batch (the prompt pass), whose token-0
        # log-prob reaches every loss, so the wrapper's backward hooks fire before any parameter's gradient is done
        rest = _forward(inner, t - 1, input_ids=completion_ids[:, :-1], attention_mask=attention,
                        position_ids=lengths[:, None] + steps, past_key_values=cache, use_cache=True)
        if rest is None:  # the prompt forward took the same keywords
            raise RuntimeError("the model refused the KV cache it accepted for the prompts")
        whole = rest[0].shape[1] == t - 1  # the LM head's output itself, not a slice of it
        rest_logits, rest_values = rest[0][:, -(t - 1):], rest[1]  # (B, T-1, V), (B, T-1) | None
    # (B, T) log-probs. As in response_outputs, unless the logits are returned the backward writes its gradient
    # into the completion logits' own memory (the entropy below is taken before any backward).
    parts = [selective_log_softmax(first_logits, completion_ids[:, 0], temperature=temperature)[:, None]]
    if rest_logits is not None:
        in_place = whole and not return_logits and rest_logits.requires_grad
        parts.append(selective_log_softmax(rest_logits, completion_ids[:, 1:], temperature=temperature,
                                           grad_in_logits=in_place))
    entropy = None
    if with_entropy:
        temp = temperature if entropy_temperature is None else entropy_temperature
        with torch.no_grad():
            entropy = torch.cat([entropy_from_logits(x.detach(), temperature=temp).reshape(x.shape[0], -1)
                                 for x in _present(first_logits[:, None], rest_logits)], 1)
    logits = torch.cat(_present(first_logits[:, None], rest_logits), 1) / temperature if return_logits else None
    values = None if first_values is None else torch.cat(_present(first_values[:, None], rest_values), 1)
    return ResponseOutputs(logp=torch.cat(parts, 1), entropy=entropy, logits=logits, values=values)


def _present(first: Tensor, rest: Tensor | None) -> list[Tensor]:
    return [first] if rest is None else [first, rest]


def _forward(model: Any, keep: int, **kwargs: Any) -> tuple[Tensor, Tensor | None] | None:
    """The model's logits, (N, keep, V) or (N, S, V) for a forward without ``logits_to_keep``, and the values
    (N, keep) of an ActorCritic; None when the forward refuses the cache keywords."""
    try:
        out = model(**kwargs, logits_to_keep=keep)
    except TypeError as err:
        if _refuses_cache(err):
            return None
        if "logits_to_keep" not in str(err):
            raise
        try:
            out = model(**kwargs)
        except TypeError as again:
            if _refuses_cache(again):
                return None
            raise
    # (a Hugging Face output is a dict, whose .values is the dict method: ask for the critic's output by type)
    return out.logits, out.values[:, -keep:] if isinstance(out, ActorCriticOutput) else None


def _refuses_cache(err: TypeError) -> bool:
    return "past_key_values" in str(err) or "use_cache" in str(err)
