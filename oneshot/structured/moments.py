"""What structured scoring reads from a consuming projection's inputs (o_proj, down_proj): their moments.

`ChannelStats` follows the engine's statistic interface (`add(x, sequences)`, `value()`), so the
engine's hooks feed it. Sums are kept in float64: a variance from sum and sum of squares over many
thousands of tokens loses its digits in float32. The Gram matrix (for the least-squares refit) is
only kept when asked for, in the model's compute dtype (at least float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..methods.masks import compute_dtype


@dataclass
class ChannelMoments:
    count: int  # tokens
    sequences: int
    total: torch.Tensor  # sum of x, float64 [features]
    squares: torch.Tensor  # sum of x^2, float64
    gram: torch.Tensor | None  # sum of x x^T, or None

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """The sample variance over tokens (n - 1 in the denominator)."""
        return ((self.squares - self.total.pow(2) / self.count) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """Wanda's s_j: the squared L2 norm of input j over all tokens, per sequence."""
        return self.squares / self.sequences


class ChannelStats:
    def __init__(self, features: int, device, dtype: torch.dtype = torch.float32, gram: bool = False):
        self.count = 0
        self.sequences = 0
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.squares = torch.zeros(features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(features, features, dtype=compute_dtype(dtype), device=device) if gram else None

    def add(self, x: torch.Tensor, sequences: int | None = None) -> None:
        rows = x.reshape(-1, x.shape[-1])
        if sequences is None:
            sequences = x.shape[0] if x.dim() > 2 else 1
        wide = rows.to(torch.float64)
        self.total += wide.sum(0)
        self.squares += wide.pow(2).sum(0)
        if self.gram is not None:
            narrow = rows.to(self.gram.dtype)
            self.gram.addmm_(narrow.t(), narrow)
        self.count += rows.shape[0]
        self.sequences += sequences

    def value(self) -> ChannelMoments:
        return ChannelMoments(self.count, self.sequences, self.total, self.squares, self.gram)


def channel_stats(gram: bool):
    """The statistic class the engine instantiates per input: with or without the Gram matrix."""
    return partial(ChannelStats, gram=gram)
