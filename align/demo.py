"""The core in one screen: every preset trains a tiny tabular policy on a toy task, through the public facade.

Run ``python -m align.demo`` (``make quickstart``). The policy is a table of logits (T positions x V tokens, token 0
= EOS); a completion earns the fraction of positions that hold the target token (positions after EOS count as
misses). Policy presets sample groups, score them, estimate advantages and step Adam on ``policy_objective``;
preference presets learn from pairs (the target vs. a random completion) with ``preference_loss``. Presets with a
critic (ppo, rto) learn a value table V(t), one value per position, with the same step (a baseline that ignores the
prefix: unbiased, if weaker than a language model's value head). The table shows
the mean reward of sampled completions (policy presets) or the probability of the target (preference presets)
before and after training, plus the §10 worked example: how much total gradient weight each sequence gets under
each aggregation. This is a demonstration of the losses, not of language-model training (that is the trainer's job).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from align import functional as F
from align.advantages import CRITIC_RETURNS
from align.algorithms import PRESETS, AlgorithmSpec
from align.losses import StepNormalizer, kl_reward_penalty
from align.objective import value_step_loss
from align.ops import entropy_from_logits, selective_log_softmax

POSITIONS, VOCAB, EOS = 6, 8, 0
TARGET = torch.tensor([3, 1, 4, 1, 5, 2])


@dataclass(frozen=True)
class ToyResult:
    name: str
    before: float
    after: float


def _sample(logits: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """n completions from the table: ids (n, T) and mask (n, T) up to and including the first EOS."""
    probs = torch.softmax(logits.detach(), -1)  # (T, V)
    ids = torch.stack([torch.multinomial(probs[t], n, replacement=True, generator=gen) for t in range(POSITIONS)], 1)
    ended = (ids == EOS).long().cumsum(-1)
    mask = ((ended == 0) | ((ended == 1) & (ids == EOS))).double()
    return ids, mask


def _reward(ids: Tensor, mask: Tensor) -> Tensor:
    return ((ids == TARGET) & (mask != 0)).double().mean(-1)  # (n,)


def _token_logp(logits: Tensor, ids: Tensor) -> Tensor:
    return selective_log_softmax(logits.unsqueeze(0).expand(ids.shape[0], -1, -1), ids)  # (n, T)


def train_policy_preset(spec: AlgorithmSpec, *, steps: int = 40, groups: int = 4, group_size: int = 8,
                        lr: float = 0.1, seed: int = 0) -> ToyResult:
    """Train the table with a policy preset; mean reward of fresh samples before and after."""
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(POSITIONS, VOCAB, generator=gen, dtype=torch.float64)
    logits = init.clone().requires_grad_(True)
    value_table = torch.zeros(POSITIONS, dtype=torch.float64, requires_grad=True)  # V(t), for presets with a critic
    critic = spec.value_loss is not None
    optimiser = torch.optim.Adam([logits, value_table] if critic else [logits], lr=lr)
    group_ids = torch.arange(groups).repeat_interleave(group_size)

    def evaluate() -> float:
        ids, mask = _sample(logits, 512, gen)
        return float(_reward(ids, mask).mean())

    before = evaluate()
    for _ in range(steps):
        ids, mask = _sample(logits, groups * group_size, gen)
        with torch.no_grad():
            old_logp, ref_logp = _token_logp(logits, ids), _token_logp(init, ids)
        rewards: Tensor = _reward(ids, mask)
        if spec.kl is not None and spec.kl_placement == "reward":
            rewards = kl_reward_penalty(old_logp, ref_logp, mask, coef=spec.kl_coef, estimator=spec.kl)
            rewards = rewards + torch.where(mask.cumsum(-1) == mask.sum(-1, keepdim=True), _reward(ids, mask)[:, None],
                                            0.0) * mask
        old_values = {"values": value_table.detach().expand(ids.shape[0], -1) * mask} if critic else {}
        advantages = F.advantages(spec.advantage or "grpo", rewards=rewards, mask=mask, group_ids=group_ids,
                                  **old_values, **spec.advantage_kwargs)
        entropy = entropy_from_logits(logits.detach()).expand(ids.shape[0], -1)
        loss, _ = F.policy_objective(spec, logp=_token_logp(logits, ids), old_logp=old_logp, advantages=advantages,
                                     mask=mask, ref_logp=ref_logp, entropy=entropy, token_ids=ids,
                                     group_ids=group_ids)
        if critic:
            returns = CRITIC_RETURNS[spec.advantage or "gae"](rewards, mask, group_ids, **old_values,
                                                              **spec.advantage_kwargs)
            loss = loss + value_step_loss(spec, value_table.expand(ids.shape[0], -1), old_values["values"], returns,
                                          mask, StepNormalizer.from_masks(mask))[0]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return ToyResult(spec.name, before, evaluate())


def train_preference_preset(spec: AlgorithmSpec, *, steps: int = 40, pairs: int = 16, lr: float = 0.1,
                            seed: int = 0) -> ToyResult:
    """Train the table on (target, random) pairs; probability of the whole target before and after."""
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(POSITIONS, VOCAB, generator=gen, dtype=torch.float64)
    logits = init.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    chosen = TARGET.expand(pairs, -1)
    full = torch.ones(pairs, POSITIONS, dtype=torch.float64)

    def target_probability() -> float:
        return float(_token_logp(logits.detach(), TARGET[None]).sum().exp())

    before = target_probability()
    for _ in range(steps):
        rejected = torch.randint(1, VOCAB, (pairs, POSITIONS), generator=gen)
        kw: dict[str, Tensor] = {}
        expand = lambda table: table.unsqueeze(0).expand(pairs, -1, -1)  # noqa: E731
        if spec.preference_loss in ("tdpo1", "tdpo2", "aligndistil"):
            kw = {"chosen_logits": expand(logits), "rejected_logits": expand(logits),
                  "ref_chosen_logits": expand(init), "ref_rejected_logits": expand(init)}
        if spec.preference_loss == "aligndistil":
            # the two teachers AlignDistil contrasts: a DPO table one nat towards the target token at each
            # position, and a reverse-DPO table one nat away from it (as DPO on swapped pairs would learn)
            lean = torch.nn.functional.one_hot(TARGET, VOCAB).to(init.dtype)  # (T, V)
            kw.update(chosen_dpo_logits=expand(init + lean), chosen_reverse_logits=expand(init - lean),
                      rejected_dpo_logits=expand(init + lean), rejected_reverse_logits=expand(init - lean))
        loss, _ = F.preference_loss(
            spec.preference_loss or "dpo", chosen_logp=_token_logp(logits, chosen),
            rejected_logp=_token_logp(logits, rejected), ref_chosen_logp=_token_logp(init, chosen),
            ref_rejected_logp=_token_logp(init, rejected), chosen_mask=full, rejected_mask=full,
            **{**spec.preference_kwargs, **kw},
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return ToyResult(spec.name, before, target_probability())


def demo_spec(name: str) -> AlgorithmSpec:
    """The preset, except GTPO's entropy filter: tuned for language models (0.7 nats), it would drop every toy
    completion (a fresh table over 8 tokens has entropy near ln 8 = 2.1), so the demo turns it off."""
    spec = PRESETS.get(name)
    return spec.with_options(loss_kwargs={"entropy_threshold": None}) if name == "gtpo" else spec


def run_all(seed: int = 0) -> list[ToyResult]:
    """Every preset, trained on the toy task."""
    results = []
    for name in PRESETS.names():
        spec = demo_spec(name)
        train = train_policy_preset if spec.kind == "policy" else train_preference_preset
        results.append(train(spec, seed=seed))
    return results


def aggregation_weights() -> dict[str, list[float]]:
    """Spec §10: total gradient weight per sequence (r = [1, 0, 0, 1], L = [3, 5, 2, 4]) under each preset."""
    lengths, rewards = [3, 5, 2, 4], torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths], dtype=torch.float64)
    groups = torch.zeros(4, dtype=torch.long)
    weights = {}
    for name in ("grpo", "dr_grpo", "dapo", "gspo"):
        spec = PRESETS.get(name).with_options(kl=None, kl_coef=0.0)
        adv = F.advantages(spec.advantage or "grpo", rewards=rewards, mask=mask, group_ids=groups)
        logp = torch.zeros_like(mask, requires_grad=True)
        loss, _ = F.policy_objective(spec, logp=logp, old_logp=torch.zeros_like(mask), advantages=adv, mask=mask)
        loss.backward()
        assert logp.grad is not None
        weights[name] = (-logp.grad).sum(-1).tolist()
    return weights


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    torch.set_num_threads(1)
    table = Table(title="Every preset on a toy task (tabular policy, 40 Adam steps)")
    for column in ("preset", "kind", "measure", "before", "after"):
        table.add_column(column)
    for result in run_all():
        spec = PRESETS.get(result.name)
        measure = "mean reward" if spec.kind == "policy" else "P(target)"
        table.add_row(result.name, spec.kind, measure, f"{result.before:.3f}", f"{result.after:.3f}")
    console.print(table)
    bias = Table(title="Total gradient weight per sequence, r=[1,0,0,1], L=[3,5,2,4] (spec §10)")
    bias.add_column("preset")
    for i in range(4):
        bias.add_column(f"seq {i + 1}")
    for name, row in aggregation_weights().items():
        bias.add_row(name, *(f"{w:+.4f}" for w in row))
    console.print(bias)
    console.print("GRPO weighs every sequence equally; DAPO gives the long negative the most weight; "
                  "Dr. GRPO's totals scale with length (L_norm = padded T = 5); GSPO matches GRPO at ratio 1.\n"
                  "gtpo runs without its entropy filter here (see align.demo.demo_spec).")


if __name__ == "__main__":
    main()
