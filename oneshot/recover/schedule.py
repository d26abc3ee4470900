"""Schedules, as pure functions of the step: the learning rate over recovery, and the sparsity of each
stage of iterative pruning.

Learning rate (a factor of the peak, for torch's LambdaLR): `warmup` steps rising linearly to the
peak ((step + 1) / warmup), then over the remaining steps constant, linear to 0, or a half cosine to 0.

Iterative sparsity: stage k of K (k = 1..K) prunes to
  linear  s_k = s_final * k / K
  cubic   s_k = s_final * (1 - (1 - k / K) ** 3)     (Zhu & Gupta, 2017: fast early, gentle near the end)
so the last stage always reaches s_final exactly.
"""
from __future__ import annotations

import math

from ..spec import LR_SCHEDULES, SPARSITY_SCHEDULES  # declared beside their settings


def lr_factor(step: int, total: int, warmup: int = 0, kind: str = "cosine") -> float:
    """The learning rate at 0-based `step` of `total`, as a fraction of the peak."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose {', '.join(LR_SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def stage_sparsity(stage: int, stages: int, final: float, kind: str = "linear") -> float:
    """The sparsity that stage `stage` (1..stages) prunes to."""
    if kind not in SPARSITY_SCHEDULES:
        raise ValueError(f"unknown sparsity schedule {kind!r}; choose {', '.join(SPARSITY_SCHEDULES)}")
    if not 1 <= stage <= stages:
        raise ValueError(f"stage {stage} is outside 1..{stages}")
    if stage == stages:
        return final
    fraction = stage / stages
    return final * (fraction if kind == "linear" else 1.0 - (1.0 - fraction) ** 3)
