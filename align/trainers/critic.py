"""The critic of PPO-style algorithms: a value head on the policy's last hidden state, trained with the policy.

Design: one shared trunk. :class:`ActorCritic` wraps the policy (a Hugging Face causal LM, or its PEFT model under
LoRA) and a linear value head ``V(s_t) = w . h_t + b`` on the final (normed) hidden state h_t that also feeds the LM
head. One forward pass gives both the token log-probs and the values, the optimiser and the checkpoint hold both,
and the value loss reaches the trunk scaled by ``vf_coef`` (total loss = policy loss + vf_coef * value loss). This
is the cheapest critic on one workstation (no second model, no second forward) and what TRL's original PPO trainer
(``AutoModelForCausalLMWithValueHead``) and OpenAI baselines' shared policies do. OpenRLHF and verl train a separate
critic model instead (its own trunk and optimiser), which isolates the policy from the value gradient at twice the
memory and compute; it is not offered yet.

The wrapper lives only inside the learner (its strategy's model): the rollout engine, the reference (LoRA adapters
disabled, or a copy of the policy taken before wrapping), evaluation and the final model see the policy alone, and
:func:`policy_weights` strips the critic from every state that leaves the learner (weight sync, final model).
Under LoRA the value head stays trainable (it is not a LoRA target; the PEFT model freezes only what exists when it
is built). The head starts at zero, so V = 0 before the first update and the first value gradients do not push the
trunk through a random projection.

Values are those of the positions that predict each response token: V(s_t) with s_t = prompt + y_<t, the state in
which token t is chosen (OpenRLHF's ``values[:, -num_actions-1:-1]``). Shapes: B rows, S tokens, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

VALUE_HEAD = "value_head"
POLICY = "policy"


@dataclass
class ActorCriticOutput:
    """What :meth:`ActorCritic.forward` returns: the policy's logits and the critic's values."""

    logits: Tensor  # (B, S', V): the last ``logits_to_keep`` positions (all S without it)
    values: Tensor  # (B, S') float32, the same positions


def hidden_size(model: Any) -> int:
    """The width D of the model's last hidden state (its input embeddings' width)."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(size) if size is not None else int(model.get_input_embeddings().embedding_dim)


class ActorCritic(nn.Module):
    """A policy and a linear value head on its last hidden state (shared trunk). ``forward`` takes the policy's
    keyword arguments and returns :class:`ActorCriticOutput`."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy
        reference = next(policy.parameters())
        # at least fp32: regression targets near 1 learnt in bf16 would keep ~3 significant digits
        dtype = torch.promote_types(reference.dtype, torch.float32)
        self.value_head = nn.Linear(hidden_size(policy), 1, device=reference.device, dtype=dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, *, logits_to_keep: int | None = None, **kwargs: Any) -> ActorCriticOutput:
        """The policy's forward with ``output_hidden_states``; values from the final hidden state (B, S, D), whose
        last ``logits_to_keep`` positions are the ones the LM head scores."""
        extra = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        out = self.policy(**kwargs, **extra, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (B, S, D) the normed state the LM head reads
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # (B, S')
        return ActorCriticOutput(logits=out.logits, values=values)


def policy_of(model: Any) -> Any:
    """The policy inside an :class:`ActorCritic`, or ``model`` itself."""
    return model.policy if isinstance(model, ActorCritic) else model


def policy_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An :class:`ActorCritic` state dict as the policy's own (its names, without the value head); a policy's state
    dict as it is."""
    if not any(k.startswith(f"{VALUE_HEAD}.") for k in state):
        return state
    prefix = f"{POLICY}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def critic_parameters(model: Any) -> list[nn.Parameter]:
    """The value head's parameters (none for a model without a critic)."""
    return list(model.value_head.parameters()) if isinstance(model, ActorCritic) else []

