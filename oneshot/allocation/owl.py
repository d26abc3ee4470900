"""OWL (Yin et al., 2024): outlier-weighed layer-wise sparsity. Blocks with more outlier weights keep more.

Order of operations, as in the authors' code (luuyin/OWL, lib/prune_all.py, prune_wanda_outlier and
prune_sparsegpt_outlier), before any block is pruned:
1. Per block, the Wanda scores |W_ij| * sqrt(act_sq_norm_j) of all its linear layers, with the
   activations of the dense model, are flattened and joined into one tensor.
2. Its outlier ratio is the share of scores strictly above M times the mean of that joined tensor
   (one mean over the whole block, so every weight counts once: big layers weigh more), in percent.
3. Across blocks the ratios are min-max rescaled to [0, 2*lambda], shifted so their mean is
   1 - target, and each block's sparsity is 1 minus its value.
4. The authors then set any sparsity <= 0 to 0.01 and clip nothing above.

Where ours differs, deliberately:
- `weights` (parameters per block) makes the parameter-weighted mean sparsity equal the target: the
  shift uses the weighted mean of the rescaled ratios instead of the plain mean. The spread is kept
  (a pure shift), and with equal weights it is the authors' plain mean.
- Bounds: instead of step 4 (which breaks the mean, and lets a block reach sparsity 1 or more when
  target + spread > 1), if a block would fall outside [0, max_sparsity] the spread around the target
  is narrowed by the smallest factor that brings every block inside, so the (weighted) mean stays the
  target and the order of blocks is kept. Within the usual range (for lambda = 0.08, targets from about
  0.16 to 0.83) nothing is narrowed and the result is the authors'.
- All ratios equal (or one block): the authors divide by zero; we return the target everywhere.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..methods.options import Option

OWL_OPTIONS: tuple[Option, ...] = (
    Option("owl_m", float, 5.0, "a score is an outlier when above owl_m times its block's mean score "
           "(the authors' Hyper_m)", above=0.0),
    Option("owl_lambda", float, 0.08, "block sparsities span 2*owl_lambda around the target "
           "(the authors' Lamda)", minimum=0.0, maximum=0.5),
)


def outlier_ratio(scores_list: Sequence[torch.Tensor], m: float) -> float:
    """Percent of the block's scores strictly above m times their mean, the mean taken over all the
    block's scores together (as if joined into one tensor, like the authors' torch.cat).

    The mean is accumulated in float64 (the authors' is float32); the two can only disagree on a
    score within rounding of the threshold.
    """
    if not scores_list:
        raise ValueError("outlier_ratio needs the scores of at least one layer")
    total = sum(s.numel() for s in scores_list)
    if total == 0:
        raise ValueError("outlier_ratio got only empty score tensors")
    mean = sum(s.detach().double().sum() for s in scores_list) / total
    threshold = m * mean
    count = sum(int((s.detach().double() > threshold).sum()) for s in scores_list)
    return count / total * 100


def owl_sparsities(ratios: Sequence[float], target: float, lam: float, weights: Sequence[float] | None = None,
                   max_sparsity: float = 0.99) -> list[float]:
    """One sparsity per block from its outlier ratio: more outliers, lower sparsity.

    Without weights the plain mean of the result is `target`; with weights (e.g. parameters per block)
    sum(w * s) / sum(w) is. Every value lies in [0, max(max_sparsity, target)].
    """
    ratios = [float(r) for r in ratios]
    target, lam = float(target), float(lam)
    if not ratios:
        raise ValueError("owl_sparsities needs at least one block's outlier ratio")
    if not all(math.isfinite(r) for r in ratios):
        raise ValueError("outlier ratios must be finite")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity {target} is outside [0, 1)")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lambda {lam} must be finite and >= 0")
    if not 0.0 < max_sparsity < 1.0:
        raise ValueError(f"max_sparsity {max_sparsity} is outside (0, 1)")
    if weights is None:
        weights = [1.0] * len(ratios)
    weights = [float(w) for w in weights]
    if len(weights) != len(ratios):
        raise ValueError(f"{len(weights)} weights for {len(ratios)} blocks")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError("block weights must be finite and > 0")

    low, high = min(ratios), max(ratios)
    if high == low or lam == 0:
        return [target] * len(ratios)
    # The authors' rescaling: block density = 1 - target + (value - mean value), value in [0, 2*lam].
    values = [(r - low) / (high - low) * 2 * lam for r in ratios]
    center = math.fsum(w * v for w, v in zip(weights, values)) / math.fsum(weights)
    deviations = [v - center for v in values]  # density above the mean: sparsity below the target
    # Narrow the spread, if needed, so that target - factor * deviation stays in [0, ceiling].
    ceiling = max(max_sparsity, target)
    factor = 1.0
    for d in deviations:
        if d > 0:
            factor = min(factor, target / d)
        elif d < 0:
            factor = min(factor, (ceiling - target) / -d)
    return [min(ceiling, max(0.0, target - factor * d)) for d in deviations]
