"""Preference training (the DPO family, token-level variants included) on TRL-format pairs.

Pairs come from ``data.path`` (columns ``prompt``, ``chosen``, ``rejected``: strings or conversations) or, for a
synthetic task, from the task itself (chosen = the right answer, rejected = a near miss). Token-level losses get
their extra inputs here: ``tdpo1``/``tdpo2`` the full-vocabulary logits of policy and reference; ``cdpo`` token
weights and ``tgdpo`` token rewards come from a ``token_extras`` callable (built from the recipe's credit module by
:mod:`align.runs`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from align.algorithms import AlgorithmSpec
from align.data.loading import as_text
from align.losses import PREFERENCE_LOSSES, PreferenceInputs
from align.trainers.precision import Precision, autocast
from align.trainers.sequences import encode, pad_left, pad_right, response_forward


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the right one (one digit changed, or off by one)."""
    if answer.lstrip("-").isdigit() and rng.random() < 0.5:
        return str(int(answer) + rng.choice([-1, 1, -10, 10]))
    chars = list(answer)
    i = rng.randrange(len(chars))
    chars[i] = rng.choice([c for c in "0123456789" if c != chars[i]])
    return "".join(chars)


def task_pairs(dataset: Any, seed: int) -> Any:
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_dict({"prompt": dataset["prompt"], "chosen": dataset["answer"],
                              "rejected": [near_miss(a, rng) for a in dataset["answer"]]})


class PairBatch:
    """Tokenised pairs: prompt (B, P) left-padded; chosen (B, Tc) and rejected (B, Tr) right-padded with EOS."""

    def __init__(self, tokenizer: Any, prompts: Sequence[Any], chosen: Sequence[Any], rejected: Sequence[Any]):
        def response(value: Any) -> str:
            return value[-1]["content"] if isinstance(value, list) else str(value)

        prompt_text = [as_text(p, tokenizer, add_generation_prompt=not isinstance(p, str)) for p in prompts]
        eos = tokenizer.eos_token_id
        self.prompt_ids, self.prompt_mask = pad_left(encode(tokenizer, prompt_text), tokenizer.pad_token_id)
        c = [[*ids, eos] for ids in encode(tokenizer, [response(v) for v in chosen])]
        r = [[*ids, eos] for ids in encode(tokenizer, [response(v) for v in rejected])]
        self.chosen_ids, self.chosen_mask = pad_right(c, tokenizer.pad_token_id)
        self.rejected_ids, self.rejected_mask = pad_right(r, tokenizer.pad_token_id)

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])


def _forward(model: Any, batch: PairBatch, rows: Tensor, *, logits: bool) -> tuple[Tensor, Tensor, Any, Any]:
    c_logp, _, c_logits = response_forward(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                           batch.chosen_ids[rows], batch.chosen_mask[rows], return_logits=logits)
    r_logp, _, r_logits = response_forward(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                           batch.rejected_ids[rows], batch.rejected_mask[rows], return_logits=logits)
    return c_logp, r_logp, c_logits, r_logits


class PreferenceStep:
    """Loss of one optimiser step over pairs, micro-batched; the mean over pairs of the whole step."""

    def __init__(self, spec: AlgorithmSpec, model: Any, reference: Callable[[], Any] | None,
                 token_extras: Callable[[PairBatch, Tensor], dict[str, Tensor]] | None, micro_batch_size: int,
                 precision: Precision = "no"):
        assert spec.preference_loss is not None
        self.precision = precision
        self.spec, self.model, self.reference = spec, model, reference
        self.loss_fn = PREFERENCE_LOSSES.get(spec.preference_loss)
        self.needs_logits = bool(PREFERENCE_LOSSES.info(spec.preference_loss).get("needs_logits"))
        self.token_extras, self.micro = token_extras, micro_batch_size

    def __call__(self, batch: PairBatch, *, backward: bool) -> dict[str, float]:
        total = len(batch)
        sums: dict[str, float] = {}
        for start in range(0, total, self.micro):
            rows = torch.arange(start, min(total, start + self.micro))
            with torch.set_grad_enabled(backward), autocast(self.precision, self.model):
                c_logp, r_logp, c_logits, r_logits = _forward(self.model, batch, rows, logits=self.needs_logits)
            ref_c = ref_r = ref_c_logits = ref_r_logits = None
            if self.reference is not None:
                with torch.no_grad(), autocast(self.precision, self.model), self.reference() as ref_model:
                    ref_c, ref_r, ref_c_logits, ref_r_logits = _forward(ref_model, batch, rows,
                                                                        logits=self.needs_logits)
            inputs = PreferenceInputs(chosen_logp=c_logp, rejected_logp=r_logp, chosen_mask=batch.chosen_mask[rows],
                                      rejected_mask=batch.rejected_mask[rows], ref_chosen_logp=ref_c,
                                      ref_rejected_logp=ref_r)
            kwargs: dict[str, Any] = dict(self.spec.preference_kwargs)
            if self.needs_logits:
                kwargs.update(chosen_logits=c_logits, rejected_logits=r_logits, ref_chosen_logits=ref_c_logits,
                              ref_rejected_logits=ref_r_logits)
            if self.token_extras is not None:
                kwargs.update(self.token_extras(batch, rows))
            per_pair, stats = self.loss_fn(inputs, **kwargs)
            loss = per_pair.sum() / total
            if backward:
                loss.backward()
            share = len(rows) / total
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + share * float(value)
        return sums
