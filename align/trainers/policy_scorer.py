"""The learner's current policy as an auxiliary scorer (a credit option naming the model ``"policy"``).

Credit modules see auxiliary models only through ``token_logprobs(input_ids, attention_mask)``. This adapter answers
it with :meth:`~align.trainers.protocols.Learner.logprobs`, which both runtimes serve (in-process, or split over the
DeepSpeed ranks), so a module that scores text with the policy being trained (``rlp_information_gain``) runs the
same on either. The log-probs are the learner's: at its temperature (``rollout.temperature``) and precision.

Shapes: B rows, S positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from align.errors import InputError
from align.trainers.protocols import Learner

POLICY = "policy"
"""The model path that names the learner's current weights in credit options (``"base"`` names the base model)."""


@dataclass(frozen=True)
class _Rows:
    """What ``Learner.logprobs`` reads: a one-token prompt and the rest as a right-padded completion."""

    prompt_ids: Tensor  # (B, 1)
    prompt_mask: Tensor  # (B, 1)
    completion_ids: Tensor  # (B, S - 1)
    mask: Tensor  # (B, S - 1)


class LearnerScorer:
    """``token_logprobs`` from the learner's current weights."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, S) -> (B, S): [:, s] = log p(input_ids[:, s] | the real tokens before s); 0 at each row's first real
        token (no context) and wherever ``attention_mask`` is 0.

        Each row's real tokens are packed in order (any padding, left, right or inside), the first becomes the
        prompt and the rest the completion, and the learner's log-probs are put back at their positions.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise InputError(f"input_ids and attention_mask must both be (B, S), got {tuple(input_ids.shape)} and "
                             f"{tuple(attention_mask.shape)}")
        real = (attention_mask != 0).long()
        if bool((real.sum(-1) == 0).any()):
            raise InputError("every row needs at least one real token (attention_mask 1) to score")
        order = torch.sort(1 - real, dim=1, stable=True).indices  # real tokens first, in their order
        packed, packed_real = input_ids.gather(1, order), real.gather(1, order)
        completion_mask = packed_real[:, 1:].float()
        rows = _Rows(prompt_ids=packed[:, :1], prompt_mask=torch.ones_like(packed[:, :1]),
                     completion_ids=torch.where(completion_mask != 0, packed[:, 1:], packed[:, :1]),
                     mask=completion_mask)
        logp = self.learner.logprobs(rows).to(torch.float32) * completion_mask  # (B, S - 1)
        out_packed = torch.cat([torch.zeros_like(logp[:, :1]), logp], 1)  # (B, S) in packed order
        return torch.zeros_like(out_packed).scatter(1, order, out_packed)
