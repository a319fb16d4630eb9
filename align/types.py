"""Shape legend and small shared types for the ``align`` package.

Shape legend (used in every docstring and ``# (…)`` comment):
    B  sequences (completions) in a batch        T  response tokens per sequence (padded)
    G  samples per prompt (group size)           V  vocabulary size
    P  prompt tokens                             N  flattened rows (B*T) inside chunked ops

Masks are float or bool tensors of shape (B, T) with 1 = trainable response token; 0 marks the prompt, padding,
tool output and any token excluded from the loss.
"""

from __future__ import annotations

from torch import Tensor

Metrics = dict[str, Tensor]
"""Detached scalar tensors keyed by a metric name such as ``"clip_frac"``."""

