"""Credit-assignment modules: sequence rewards -> token rewards or token weights, swappable by name.

Registry: ``CREDIT`` (see :mod:`rewards.credit.base` for the one signature and the two kinds of output).
"""

from rewards.credit import (  # noqa: F401  (registers)
    contrastive,
    contrastive_dpo,
    contrastive_prompting,
    implicit,
    macro,
    outcome,
    process,
    rlp,
    thr,
    turns,
    weights,
)
from rewards.credit.base import CREDIT, CreditInputs, LogitsModel, TokenLogProbModel, register_credit
from rewards.credit.diagnostics import CreditReport, explain
from rewards.credit.models import CausalLMScorer

__all__ = [
    "CREDIT",
    "CausalLMScorer",
    "CreditInputs",
    "CreditReport",
    "LogitsModel",
    "TokenLogProbModel",
    "explain",
    "register_credit",
]
