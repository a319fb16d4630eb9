"""Credit assignment: one signature that turns sequence rewards into token-level credit.

``module(x: CreditInputs, **options) -> Tensor (B, T)``, detached, 0 off the mask. Each module registers what it
produces (``output``):

* ``"rewards"``: token rewards r_{i,t}. A token-level advantage estimator (``dense_group``, ``reinforce_pp``, ``gae``)
  turns them into advantages; ``uniform`` and ``last_token`` carry only the sequence reward (kind ``"sequence"``),
  so the sequence estimators may sum them back without loss.
* ``"weights"``: multiplicative token weights, applied to the advantages after the estimator (GTPO's conflict
  weights, entropy weights, cDPO-style critical-token weights, THR).

Modules that need auxiliary models take them as options implementing :class:`TokenLogProbModel` (anything that
returns per-token log-probs for token ids), so tests use tiny offline models and a Ray runtime can serve them.
Shapes: B completions, T response tokens, P prompt tokens, V vocabulary, D hidden size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from align.algorithms import CREDIT_LEVELS
from align.errors import InputError
from align.ops import check_finite
from align.registry import Registry

CreditOutput = Literal["rewards", "weights"]
CreditModule = Callable[..., Tensor]
CREDIT: Registry[CreditModule] = Registry("credit module")
F = TypeVar("F", bound=CreditModule)


@runtime_checkable
class TokenLogProbModel(Protocol):
    """An auxiliary model seen only through its per-token log-probs."""

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, S) -> (B, S) with [:, s] = log p(input_ids[:, s] | input_ids[:, :s]);
        position 0 has no context and may hold anything."""
        ...


@runtime_checkable
class LogitsModel(Protocol):
    """Optionally, full next-token logits: (B, S) -> (B, S, V), [:, s] predicting input_ids[:, s + 1]."""

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class CreditInputs:
    """Everything a credit module may read. Per-token tensors are (B, T) over response tokens."""

    rewards: Tensor  # (B,) sequence rewards
    mask: Tensor  # (B, T) 1 = trainable response token
    token_ids: Tensor  # (B, T) long
    group_ids: Tensor  # (B,) long, one id per prompt
    prompt_ids: Tensor | None = None  # (B, P) long, left-padded; auxiliary models need the context
    prompt_mask: Tensor | None = None  # (B, P)
    step_rewards: Sequence[Sequence[float]] | None = None  # per row, one score per reasoning step (PRMs)
    logp: Tensor | None = None  # (B, T) log-probs of the sampled tokens under the rollout policy
    entropy: Tensor | None = None  # (B, T) full-vocabulary entropy of the rollout policy
    token_rewards: Tensor | None = None  # (B, T) dense rewards to include (e.g. a KL-in-reward penalty)
    logits: Tensor | None = None  # (B, T, V) rollout-policy logits predicting each response token (THR)
    hidden: Tensor | None = None  # (B, T, D) final hidden states at the positions that predict them (THR)
    target_ids: Tensor | None = None  # (B, X) long, right-padded: the row's reference answer (RLP's observed text)
    target_mask: Tensor | None = None  # (B, X) 1 = a real target token
    turn_rewards: Sequence[Sequence[float]] | None = None  # per row, the environment's reward of each model turn
    turn_ends: Sequence[Sequence[int]] | None = None  # per row, the position (in T) of each model turn's last token

    def __post_init__(self) -> None:
        if self.mask.dim() != 2:
            raise InputError(f"mask must be (B, T), got {tuple(self.mask.shape)}")
        b, t = self.mask.shape
        if self.rewards.shape != (b,):
            raise InputError(f"rewards must be (B,) = ({b},) sequence rewards, got {tuple(self.rewards.shape)}")
        if self.token_ids.shape != (b, t) or self.group_ids.shape != (b,):
            raise InputError(f"token_ids must be (B, T) = {(b, t)} and group_ids (B,) = ({b},); got "
                             f"{tuple(self.token_ids.shape)} and {tuple(self.group_ids.shape)}")
        for name in ("logp", "entropy", "token_rewards"):
            value = getattr(self, name)
            if value is not None and value.shape != (b, t):
                raise InputError(f"{name} must be (B, T) = {(b, t)}, got {tuple(value.shape)}")
        shapes = [None if v is None else tuple(v.shape) for v in (self.target_ids, self.target_mask)]
        if shapes != [None, None] and (shapes[0] is None or len(shapes[0]) != 2 or shapes[0][0] != b
                                       or shapes[1] != shapes[0]):
            raise InputError(f"target_ids and target_mask must be given together, both (B, X) with B = {b}; got "
                             f"shapes {shapes[0]} and {shapes[1]}")
        check_finite("rewards", self.rewards)

    @property
    def float_mask(self) -> Tensor:
        """(B, T) 0/1 in :attr:`dtype`."""
        return (self.mask != 0).to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.rewards.dtype if self.rewards.dtype == torch.float64 else torch.float32

    def require(self, module: str, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise InputError(f"credit module {module!r} needs {', '.join(missing)} in its inputs")


def register_credit(name: str, *, output: CreditOutput, level: str, owns_scale: bool = False) -> Callable[[F], F]:
    """Register a credit module, and its kind (``level``) with the core's compatibility check.

    ``owns_scale``: the module sets the scale of its token rewards itself (``prm_steps``, whose ``normalize`` is
    GRPO-PRM's group normalisation), so the check refuses an estimator that would divide them by a group std again.
    """
    if output not in ("rewards", "weights"):
        raise InputError(f"credit output must be 'rewards' or 'weights', got {output!r}")

    def add(fn: F) -> F:
        def wrapped(x: CreditInputs, **options: Any) -> Tensor:
            with torch.no_grad():
                out = fn(x, **options)
            return torch.where(x.mask != 0, out, torch.zeros((), dtype=out.dtype)).detach()

        wrapped.__doc__, wrapped.__name__, wrapped.__wrapped__ = fn.__doc__, fn.__name__, fn  # type: ignore[attr-defined]
        CREDIT.register(name, wrapped, output=output, level=level, owns_scale=owns_scale)
        CREDIT_LEVELS.register(name, level, owns_scale=owns_scale)
        return fn

    return add


def response_logprobs(model: TokenLogProbModel, x: CreditInputs) -> Tensor:
    """Log-probs of the response tokens under ``model``, given the prompt as context. -> (B, T)."""
    if not isinstance(model, TokenLogProbModel):
        raise InputError(f"auxiliary models must provide token_logprobs(input_ids, attention_mask); got "
                         f"{type(model).__name__}")
    full_ids, full_mask = _full_sequence(x)
    out = model.token_logprobs(full_ids, full_mask)
    if out.shape != full_ids.shape:
        raise InputError(f"token_logprobs returned {tuple(out.shape)}, expected (B, S) = {tuple(full_ids.shape)}")
    response = out[:, -x.mask.shape[1] :].to(x.dtype)
    check_finite("auxiliary log-probs", response, x.mask)
    return response


def response_logits(model: LogitsModel, x: CreditInputs) -> Tensor:
    """Next-token logits at the positions that predict each response token. -> (B, T, V)."""
    if x.prompt_ids is None or x.prompt_ids.shape[1] == 0:
        raise InputError("next-token logits of the first response token need the prompt: pass prompt_ids")
    full_ids, full_mask = _full_sequence(x)
    logits = model.logits(full_ids, full_mask)
    t = x.mask.shape[1]
    return logits[:, -t - 1 : -1]


def _full_sequence(x: CreditInputs) -> tuple[Tensor, Tensor]:
    response_mask = torch.ones_like(x.token_ids)
    if x.prompt_ids is None:
        return x.token_ids, response_mask
    prompt_mask = torch.ones_like(x.prompt_ids) if x.prompt_mask is None else (x.prompt_mask != 0).long()
    return torch.cat([x.prompt_ids, x.token_ids], 1), torch.cat([prompt_mask, response_mask], 1)
