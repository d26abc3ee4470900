"""Magnitude pruning: drop the smallest |W|, with one threshold per weight matrix (or per N:M group)."""
from __future__ import annotations

import torch

from .masks import Pattern, PruneResult, compute_dtype, nm_mask, threshold_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    scores = weight.abs().to(compute_dtype(weight.dtype))
    if pattern.is_nm:
        return nm_mask(scores, pattern)
    return threshold_mask(scores, sparsity)


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: Pattern):
    """Prune one weight [outputs, inputs]; the new weight keeps its dtype."""
    mask = magnitude_mask(weight, sparsity, pattern)
    return PruneResult(weight.masked_fill(mask, 0), mask, {})
