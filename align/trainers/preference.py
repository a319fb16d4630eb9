"""Preference data: TRL-format pairs as tensors, and pairs built from a synthetic task.

Pairs come from ``data.path`` (columns ``prompt``, ``chosen``, ``rejected``: strings or conversations) or, for a
synthetic task, from the task itself (chosen = the right answer, rejected = a near miss). The loss itself is
:class:`align.trainers.learner.PreferenceLearner`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from align.data.loading import as_text
from align.trainers.learner import PairBatch
from align.trainers.sequences import encode, pad_left, pad_right


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


def tokenize_pairs(tokenizer: Any, prompts: Sequence[Any], chosen: Sequence[Any], rejected: Sequence[Any]) -> PairBatch:
    """Pairs as tensors: prompts left-padded, chosen and rejected responses right-padded and ended with EOS."""

    def response(value: Any) -> str:
        return value[-1]["content"] if isinstance(value, list) else str(value)

    prompt_text = [as_text(p, tokenizer, add_generation_prompt=not isinstance(p, str)) for p in prompts]
    eos = tokenizer.eos_token_id
    prompt_ids, prompt_mask = pad_left(encode(tokenizer, prompt_text), tokenizer.pad_token_id)
    c = [[*ids, eos] for ids in encode(tokenizer, [response(v) for v in chosen])]
    r = [[*ids, eos] for ids in encode(tokenizer, [response(v) for v in rejected])]
    chosen_ids, chosen_mask = pad_right(c, tokenizer.pad_token_id)
    rejected_ids, rejected_mask = pad_right(r, tokenizer.pad_token_id)
    return PairBatch(prompt_ids, prompt_mask, chosen_ids, chosen_mask, rejected_ids, rejected_mask)
