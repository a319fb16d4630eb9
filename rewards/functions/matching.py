"""Answer checking: math equivalence (math-verify), exact match, and a format/tag check."""

from __future__ import annotations

import logging
import re
import typing
from typing import Literal

from rewards.registry import reward

Extract = Literal["auto", "tag", "boxed", "full"]
EXTRACT_MODES: tuple[str, ...] = typing.get_args(Extract)

_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
THINK_ANSWER = r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*"


def extract_answer(completion: str, how: Extract = "auto") -> str:
    """The answer part of a completion: ``"tag"`` (<answer>...</answer>), ``"boxed"`` (\\boxed{...}), ``"full"``
    (the whole text), or ``"auto"`` (the last tag, else the last box, else the whole text)."""
    if how not in EXTRACT_MODES:  # a recipe's options are checked by validate; a direct call is checked here
        raise ValueError(f"extract must be auto, tag, boxed or full, got {how!r}")
    if how in ("auto", "tag"):
        tags = _TAG.findall(completion)
        if tags or how == "tag":
            return tags[-1] if tags else ""
    if how in ("auto", "boxed"):
        boxes = _BOXED.findall(completion)
        if boxes or how == "boxed":
            return boxes[-1] if boxes else ""
    return completion


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


@reward("exact_match")
def exact_match(completion: str, answer: str, *, extract: Extract = "auto", normalize: bool = True) -> float:
    """1.0 if the extracted answer equals the ``answer`` column (case and whitespace folded by default), else 0.0."""
    got = extract_answer(completion, extract)
    return float(_normalise(got) == _normalise(str(answer)) if normalize else got == str(answer))


@reward("math_equivalence")
def math_equivalence(completion: str, answer: str, *, extract: Extract = "auto") -> float:
    """1.0 if the completion's answer is mathematically equivalent to ``answer`` (math-verify), else 0.0.

    math-verify's own signal-based timeouts are off (they only work on the main thread); the reward runner's
    per-call timeout applies instead. A reference answer that cannot be parsed is an error, not a 0.
    """
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that timeouts are off
    gold_text = str(answer)
    gold = parse(gold_text if "$" in gold_text or "\\" in gold_text else f"${gold_text}$", parsing_timeout=None)
    if not gold:
        raise ValueError(f"could not parse the reference answer {gold_text!r}")
    candidate = extract_answer(completion, extract)
    predicted = parse(candidate if "$" in candidate or "\\" in candidate else f"${candidate}$", parsing_timeout=None)
    return float(bool(predicted) and verify(gold, predicted, timeout_seconds=None))


@reward("format")
def format_check(completion: str, *, pattern: str = THINK_ANSWER) -> float:
    """1.0 if the whole completion matches ``pattern`` (default: <think>...</think> then <answer>...</answer>)."""
    return float(re.fullmatch(pattern, completion, flags=re.S) is not None)
