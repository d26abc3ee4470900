"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2 and prune within each output row.

`act_sq_norm[j]` is the squared L2 norm of input feature j over all calibration tokens,
averaged over sequences; the score uses its square root.
"""
from __future__ import annotations

import torch

from .masks import Pattern, PruneResult, compute_dtype, nm_mask, row_mask


def wanda_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(weight.dtype, act_sq_norm.dtype)
    return weight.abs().to(dtype) * torch.sqrt(act_sq_norm.to(dtype)).reshape(1, -1)


def wanda_mask(weight: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    scores = wanda_scores(weight, act_sq_norm)
    if pattern.is_nm:
        return nm_mask(scores, pattern)
    return row_mask(scores, sparsity)


def wanda_prune(weight: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float, pattern: Pattern):
    """Prune one weight [outputs, inputs]; the new weight keeps its dtype."""
    mask = wanda_mask(weight, act_sq_norm, sparsity, pattern)
    return PruneResult(weight.masked_fill(mask, 0), mask, {})
