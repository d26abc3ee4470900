"""Running statistics of a layer's input, accumulated in fp32 whatever the model dtype.

The engine feeds each accumulator the input batch of a layer, shaped [..., features], and says how
many sequences it holds (some blocks flatten [batch, tokens] before their MLP, as OPT does).
N counts sequences, as in the papers' code.
"""
from __future__ import annotations

import torch


def _as_rows(x: torch.Tensor, sequences: int | None) -> tuple[torch.Tensor, int]:
    if sequences is None:
        sequences = x.shape[0] if x.dim() > 2 else 1
    return x.reshape(-1, x.shape[-1]), sequences


_HALF_GEMM = [True]  # whether this torch has half x half -> fp32 matmuls on CUDA


class Hessian:
    """H = (2/N) * sum over sequences of X X^T (X: features x tokens), SparseGPT's layer Hessian."""

    def __init__(self, features: int, device):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.sequences = 0

    def add(self, x: torch.Tensor, sequences: int | None = None) -> None:
        rows, sequences = _as_rows(x, sequences)
        if rows.is_cuda and rows.dtype in (torch.float16, torch.bfloat16) and _HALF_GEMM[0]:
            # A product of two half values is exact in fp32: tensor cores with fp32 output lose only
            # summation order (relative error ~1e-4), at about 10x the speed of an fp32 GEMM.
            try:
                self.sum += torch.mm(rows.t(), rows, out_dtype=torch.float32)
                self.sequences += sequences
                return
            except (TypeError, RuntimeError):  # torch without mm(out_dtype=...)
                _HALF_GEMM[0] = False
        rows = rows.float()
        self.sum.addmm_(rows.t(), rows)
        self.sequences += sequences

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / self.sequences)


class ActSqNorm:
    """s_j = (1/N) * sum over tokens of x_j^2: Wanda's squared input-feature norm per sequence."""

    def __init__(self, features: int, device):
        self.sum = torch.zeros(features, dtype=torch.float32, device=device)
        self.sequences = 0

    def add(self, x: torch.Tensor, sequences: int | None = None) -> None:
        rows, sequences = _as_rows(x, sequences)
        self.sum += rows.float().pow(2).sum(0)
        self.sequences += sequences

    def value(self) -> torch.Tensor:
        return self.sum / self.sequences
