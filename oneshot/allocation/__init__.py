"""Per-block sparsity allocation: how a model-wide target is shared among decoder blocks.

Pure functions of numbers and tensors; the engine gathers the statistics and applies the result.
"""
from __future__ import annotations

from .owl import OWL_OPTIONS, outlier_ratio, owl_sparsities

__all__ = ["OWL_OPTIONS", "outlier_ratio", "owl_sparsities"]
