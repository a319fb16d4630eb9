"""Token-level diagnostics: the credit each module gives each token, ready for a report to colour text by."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from rewards.credit.base import CREDIT, CreditInputs


@dataclass(frozen=True)
class CreditReport:
    """Per-module credit for one batch. ``credits[name]`` is (B, T), 0 off the mask."""

    inputs: CreditInputs
    credits: dict[str, Tensor]

    def to_records(self, tokens: Sequence[Sequence[str]] | None = None) -> list[dict[str, Any]]:
        """One JSON-ready record per completion: its trainable tokens (text if ``tokens`` is given, else ids),
        positions, sequence reward, and each module's credit per token."""
        records = []
        for i in range(self.inputs.mask.shape[0]):
            positions = (self.inputs.mask[i] != 0).nonzero().squeeze(-1).tolist()
            shown = [tokens[i][t] for t in positions] if tokens is not None else [
                int(self.inputs.token_ids[i, t]) for t in positions]
            records.append({
                "row": i,
                "group": int(self.inputs.group_ids[i]),
                "reward": float(self.inputs.rewards[i]),
                "positions": positions,
                "tokens": shown,
                "credit": {name: [float(c[i, t]) for t in positions] for name, c in self.credits.items()},
                "output": {name: CREDIT.info(name)["output"] for name in self.credits},
            })
        return records


def explain(x: CreditInputs, modules: Sequence[str] | Mapping[str, Mapping[str, Any]]) -> CreditReport:
    """Run several credit modules on the same batch: ``["uniform", "last_token"]`` or ``{"discounted": {"gamma":
    0.9}}``. Unknown names fail with the known ones listed."""
    options: Mapping[str, Mapping[str, Any]] = (
        modules if isinstance(modules, Mapping) else {name: {} for name in modules})
    return CreditReport(x, {name: CREDIT.get(name)(x, **dict(opts)) for name, opts in options.items()})
