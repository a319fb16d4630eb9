"""Self-generated token rewards from contrastive prompting (T-REG, Zhou et al., ACL 2025, arXiv 2412.02685).

One model (the reference by default) scores each response token twice: after the prompt wrapped in an instruction
to respond *better* and after one to respond *worse*. Tokens the "better" context finds more likely get a positive
reward. Shapes: B completions, T response tokens, P prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from align.errors import InputError
from rewards.credit.base import CreditInputs, TokenLogProbModel, register_credit, response_logprobs
from rewards.credit.outcome import terminal_rewards

PLACEHOLDER = "{prompt}"
# the four axes of the paper's opposite revision prompts (helpful, correct, coherent, concise vs. their opposites)
BETTER_TEMPLATE = "Give a helpful, correct, coherent and concise response.\n{prompt}"
WORSE_TEMPLATE = "Give an unhelpful, incorrect, incoherent and verbose response.\n{prompt}"


def split_template(name: str, template: str) -> tuple[str, str]:
    """``"before{prompt}after"`` -> ("before", "after"); one-line InputError unless {prompt} occurs exactly once."""
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise InputError(f"{name} must be text holding {PLACEHOLDER} exactly once (where the prompt goes), e.g. "
                         f"{BETTER_TEMPLATE!r}; got {template!r}")
    before, after = template.split(PLACEHOLDER)
    return before, after


def wrap_prompts(prompt_ids: Tensor, prompt_mask: Tensor | None, prefix: Sequence[int], suffix: Sequence[int], *,
                 pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Each prompt's tokens between ``prefix`` and ``suffix`` ids, left-padded again.

    prompt_ids: (B, P) left-padded, prompt_mask: (B, P) (None: no padding). -> (ids (B, P'), mask (B, P') long)
    with P' = max_i(len(prefix) + L_i + len(suffix)); padding positions hold ``pad_id`` and mask 0.
    """
    mask = torch.ones_like(prompt_ids) if prompt_mask is None else (prompt_mask != 0).long()
    head = torch.as_tensor(list(prefix), dtype=prompt_ids.dtype, device=prompt_ids.device)
    tail = torch.as_tensor(list(suffix), dtype=prompt_ids.dtype, device=prompt_ids.device)
    rows = [torch.cat([head, ids[m != 0], tail]) for ids, m in zip(prompt_ids, mask, strict=True)]
    width = max(len(r) for r in rows) if rows else 0
    out = prompt_ids.new_full((len(rows), width), pad_id)
    out_mask = torch.zeros((len(rows), width), dtype=torch.long, device=prompt_ids.device)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row):] = row
            out_mask[i, width - len(row):] = 1
    return out, out_mask


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def contrastive_context(x: CreditInputs, tokenizer: Any, template: str, name: str) -> CreditInputs:
    """``x`` with its prompts wrapped in ``template`` (text, ``{prompt}`` marking the prompt). The instruction text
    is tokenised on its own and spliced around the prompt's token ids, so the prompt keeps exactly its tokens (the
    boundaries may tokenise differently than the joined text would)."""
    before, after = split_template(name, template)
    if tokenizer is None:
        raise InputError("contrastive_prompting needs a tokenizer to encode its instruction templates (training "
                         "passes the run's own); pass tokenizer=...")
    x.require("contrastive_prompting", "prompt_ids")
    assert x.prompt_ids is not None
    pad = getattr(tokenizer, "pad_token_id", None)
    ids, mask = wrap_prompts(x.prompt_ids, x.prompt_mask, _encode(tokenizer, before), _encode(tokenizer, after),
                             pad_id=0 if pad is None else int(pad))
    return replace(x, prompt_ids=ids, prompt_mask=mask)


@register_credit("contrastive_prompting", output="rewards", level="token_rewards")
def contrastive_prompting(
    x: CreditInputs,
    *,
    ref_model: TokenLogProbModel,
    tokenizer: Any = None,
    better_template: str = BETTER_TEMPLATE,
    worse_template: str = WORSE_TEMPLATE,
    outcome_weight: float = 1.0,
) -> Tensor:
    """T-REG's token rewards (arXiv 2412.02685, §3): r_t = sigma(log pi(y_t | x_better, y_<t) - log pi(y_t |
    x_worse, y_<t)) - 0.5, in (-0.5, 0.5), plus ``outcome_weight`` * R_i on the last token. (B, T).

    ``ref_model`` scores both contexts (the paper uses the reference model, hence the name; any scorer works).
    ``better_template`` / ``worse_template`` are text with ``{prompt}`` where the (already rendered) prompt goes;
    ``tokenizer`` encodes them (the run's own tokenizer during training). The defaults are the project's short
    instructions along the paper's four axes (helpful, correct, coherent, concise vs. unhelpful, incorrect,
    incoherent, verbose); the paper's exact revision prompts were not available. ``treg`` reads the rewards
    without the outcome (``outcome_weight = 0``); as RL credit they shape the sequence reward.
    """
    better = contrastive_context(x, tokenizer, better_template, "better_template")
    worse = contrastive_context(x, tokenizer, worse_template, "worse_template")
    gap = response_logprobs(ref_model, better) - response_logprobs(ref_model, worse)  # (B, T)
    return (torch.sigmoid(gap) - 0.5) * x.float_mask + outcome_weight * terminal_rewards(x)
