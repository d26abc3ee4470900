"""The pruning methods as pure tensor functions, and the registry the engine and CLI use.

Each method declares which input statistic it needs (or none); the engine accumulates that
statistic from each linear layer's inputs and calls `prune(weight, statistic, sparsity, pattern)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .admm import ADMM_OPTIONS, AdmmHessian, admm_prune, prepare_admm
from .magnitude import magnitude_prune
from .masks import PatternError, Pattern, PruneResult, check_sparsity, parse_pattern
from .sparsegpt import InverseHessian, NumericsError, prepare_hessian, sparsegpt_prune
from .statistics import ActSqNorm, Hessian
from .wanda import wanda_prune


@dataclass(frozen=True)
class Method:
    name: str
    statistic: Optional[type]  # accumulator class fed with layer inputs; None needs no calibration
    prune: Callable[..., PruneResult]  # (weight, prepared statistic or None, sparsity, pattern, **options)
    summary: str
    # Work done once per statistic, shared by every layer reading the same input: (value, **options).
    prepare: Optional[Callable] = None


METHODS = {
    "magnitude": Method(
        "magnitude", None, lambda w, _stat, p, pattern, **kw: magnitude_prune(w, p, pattern, **kw),
        "drop the smallest |W|; one threshold per matrix",
    ),
    "wanda": Method(
        "wanda", ActSqNorm, wanda_prune,
        "drop the smallest |W|*||X||_2 within each output row",
    ),
    "sparsegpt": Method(
        "sparsegpt", Hessian, sparsegpt_prune,
        "OBS reconstruction with the inverse Hessian, lazy block updates, adaptive masks",
        prepare=prepare_hessian,
    ),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise PatternError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} (or dense)") from None


__all__ = [
    "METHODS", "Method", "get_method", "Pattern", "PatternError", "PruneResult", "NumericsError",
    "parse_pattern", "check_sparsity", "magnitude_prune", "wanda_prune", "sparsegpt_prune", "prepare_hessian",
    "InverseHessian", "admm_prune", "prepare_admm", "ADMM_OPTIONS", "AdmmHessian",
    "Hessian", "ActSqNorm",
]
