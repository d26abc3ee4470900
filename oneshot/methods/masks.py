"""Sparsity patterns and the mask rules the methods share.

A mask is a bool tensor shaped like the weight: True marks a weight to prune (set to zero).
Pattern "N:M" means N of every M consecutive inputs in a row are pruned (2:4 and 4:8 are 50%),
as in the SparseGPT and Wanda reference code. The structured patterns (layers, heads, channels,
width) remove whole units instead of zeroing weights; oneshot.structured carries them out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import UsageError
from ..spec import STRUCTURED_PATTERNS  # declared beside the pattern setting


class PruneResult(NamedTuple):
    """What every method returns: the new weight (same dtype), the pruned positions, and notes; a
    quantising method adds its grid parameters (quantize.QuantizedWeight) for export."""

    weight: torch.Tensor
    mask: torch.Tensor
    info: dict = {}
    quantized: object = None


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """What the methods compute in: fp32 for half, bfloat16 and fp32 inputs; fp64 if any input is
    fp64 (for numerical studies)."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


class PatternError(UsageError):
    """A sparsity pattern or target that cannot be honoured; the message says what to change."""





@dataclass(frozen=True)
class Pattern:
    n: int = 0  # pruned per group; 0 means unstructured
    m: int = 0  # group size
    structure: str = ""  # one of STRUCTURED_PATTERNS: whole units are removed, not weights zeroed

    @property
    def is_nm(self) -> bool:
        """N:M (semi-structured). "Structured" is kept for removing heads, channels or blocks."""
        return self.m > 0

    @property
    def is_structured(self) -> bool:
        return bool(self.structure)

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return self.structure or (f"{self.n}:{self.m}" if self.is_nm else "unstructured")

    def check_width(self, columns: int, name: str = "layer") -> None:
        if self.is_nm and columns % self.m:
            raise PatternError(
                f"pattern {self} needs the input width to be a multiple of {self.m}, "
                f"but {name} has {columns} inputs; choose an M that divides {columns}"
            )


UNSTRUCTURED = Pattern()


def parse_pattern(text: str | Pattern) -> Pattern:
    """'unstructured', 'N:M' with 0 < N < M, or a structured pattern (layers, heads, channels, width)."""
    if isinstance(text, Pattern):
        return text
    text = str(text).strip().lower()
    if text == "unstructured":
        return UNSTRUCTURED
    if text in STRUCTURED_PATTERNS:
        return Pattern(structure=text)
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise PatternError(f"pattern {text!r} is not 'unstructured', 'N:M' (for example 2:4 or 4:8) or one of "
                           f"{', '.join(STRUCTURED_PATTERNS)}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise PatternError(f"pattern {text!r} needs 0 < N < M (for example 2:4 or 4:8)")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise PatternError(f"sparsity {sparsity} is outside [0, 1); give a fraction such as 0.5")
    return sparsity


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the N lowest scores in every group of M consecutive columns, per row (vectorised)."""
    rows, cols = scores.shape
    pattern.check_width(cols)
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    lowest = torch.topk(groups, pattern.n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def threshold_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold over the whole tensor: prune scores <= the value at rank floor(numel * p).

    This is the reference rule (inclusive threshold), so it prunes at least one entry when p > 0.
    """
    if sparsity == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.flatten()
    threshold = torch.kthvalue(flat, int(flat.numel() * sparsity) + 1).values  # = sort(flat)[floor(n*p)]
    return scores <= threshold


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(cols * p) lowest scores of every row (stable sort, so ties go to the lower index)."""
    rows, cols = scores.shape
    k = int(cols * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask
