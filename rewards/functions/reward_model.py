"""Score completions with a local sequence-classification model (a trained reward model)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from annotated_types import Ge

from rewards.registry import reward


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


@reward("reward_model", batched=True)
def reward_model(
    prompts: Sequence[str], completions: Sequence[str], *, path: str = "", batch_size: Annotated[int, Ge(1)] = 16,
    max_length: Annotated[int, Ge(1)] = 1024, device: str = "cpu",
) -> list[float]:
    """Scores prompt + completion with the model at ``path`` (a local directory; nothing is downloaded offline).

    One label: the logit is the score. Two or more labels: log p(last label) - log p(first label).
    """
    if not path:
        raise ValueError("reward_model needs options: {path: <local model directory>}")
    tokenizer, model = _load(path, device)
    scores: list[float] = []
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            logits = model(**enc).logits.float()
            if logits.shape[-1] == 1:
                scores.extend(logits[:, 0].tolist())
            else:
                logp = torch.log_softmax(logits, -1)
                scores.extend((logp[:, -1] - logp[:, 0]).tolist())
    return scores
