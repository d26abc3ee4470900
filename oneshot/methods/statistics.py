"""Running statistics of a layer's input, accumulated in fp32 (fp64 for a float64 model).

The engine feeds each accumulator the input batch of a layer, shaped [..., features], and says how
many sequences it holds (some blocks flatten [batch, tokens] before their MLP, as OPT does).
N counts sequences, as in the papers' code. An expert is fed only the tokens routed to it (possibly
none) but counts every sequence, so its N is the calibration set's like every other layer's; `tokens`
says how many rows it actually saw.
"""
from __future__ import annotations

import torch

from .masks import compute_dtype
from .numerics import escalating_damping


def _as_rows(x: torch.Tensor, sequences: int | None) -> tuple[torch.Tensor, int]:
    if sequences is None:
        sequences = x.shape[0] if x.dim() > 2 else 1
    return x.reshape(-1, x.shape[-1]), sequences


_HALF_GEMM = [True]  # whether this torch has half x half -> fp32 matmuls on CUDA


def _tiles(features: int) -> list[tuple[int, int]]:
    """Up to 4 column ranges of at least 192 features: the Gram matrix is built tile by tile."""
    count = max(1, min(4, features // 192))
    edges = [round(i * features / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


class Hessian:
    """H = (2/N) * sum over sequences of X X^T (X: features x tokens), SparseGPT's layer Hessian.

    H is symmetric, so only the tiles on and below the diagonal are computed (10 of 16 GEMM tiles
    for wide layers: ~37% fewer FLOPs) and value() mirrors the lower triangle; the result is exactly
    symmetric.
    """

    def __init__(self, features: int, device, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(features, features, dtype=compute_dtype(dtype), device=device)
        self.sequences = 0
        self.tokens = 0
        self._tiles = _tiles(features)

    def add(self, x: torch.Tensor, sequences: int | None = None) -> None:
        rows, sequences = _as_rows(x, sequences)
        self.tokens += rows.shape[0]
        if not rows.shape[0]:  # an expert no token of this chunk was routed to
            self.sequences += sequences
            return
        if rows.is_cuda and rows.dtype in (torch.float16, torch.bfloat16) and _HALF_GEMM[0]:
            # A product of two half values is exact in fp32: tensor cores with fp32 output lose only
            # summation order (relative error ~1e-4), at about 10x the speed of an fp32 GEMM.
            try:
                self._add_gram(rows, lambda a, b: torch.mm(a, b, out_dtype=torch.float32))
                self.sequences += sequences
                return
            except (TypeError, RuntimeError):  # torch without mm(out_dtype=...)
                _HALF_GEMM[0] = False
        self._add_gram(rows.to(self.sum.dtype), None)
        self.sequences += sequences

    def _add_gram(self, rows: torch.Tensor, mm) -> None:
        for i, (a, b) in enumerate(self._tiles):
            for c, e in self._tiles[: i + 1]:
                if mm is None:
                    self.sum[a:b, c:e].addmm_(rows[:, a:b].t(), rows[:, c:e])
                else:
                    self.sum[a:b, c:e] += mm(rows[:, a:b].t(), rows[:, c:e])

    def value(self) -> torch.Tensor:
        lower = self.sum.tril()
        return (lower + lower.tril(-1).t()) * (2.0 / self.sequences)


class ActSqNorm:
    """s_j = (1/N) * sum over tokens of x_j^2: Wanda's squared input-feature norm per sequence."""

    def __init__(self, features: int, device, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(features, dtype=compute_dtype(dtype), device=device)
        self.sequences = 0
        self.tokens = 0

    def add(self, x: torch.Tensor, sequences: int | None = None) -> None:
        rows, sequences = _as_rows(x, sequences)
        self.tokens += rows.shape[0]
        self.sum += rows.to(self.sum.dtype).pow(2).sum(0)
        self.sequences += sequences

    def value(self) -> torch.Tensor:
        return self.sum / self.sequences


class InputGap:
    """G = (2/N) * sum over sequences of (X_dense - X) X^T: how the dense model's input to a layer differs from
    the pruned model's input to it, token by token, against the pruned input (asymmetric calibration,
    --asymmetric). Normalised as Hessian, so that H + G = (2/N) sum X_dense X^T; kept as the difference, which
    is exactly 0 where both models feed the layer the same values, and does not lose the small gap to the
    rounding of two large sums."""

    def __init__(self, features: int, device, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(features, features, dtype=compute_dtype(dtype), device=device)
        self.sequences = 0

    def add(self, dense: torch.Tensor, pruned: torch.Tensor, sequences: int | None = None) -> None:
        rows, sequences = _as_rows(pruned, sequences)
        reference = dense.reshape(-1, dense.shape[-1])
        if reference.shape != rows.shape:
            raise ValueError(f"the dense and pruned inputs of a layer differ in shape: {tuple(reference.shape)} "
                             f"against {tuple(rows.shape)}")
        rows = rows.to(self.sum.dtype)
        self.sum.addmm_((reference.to(self.sum.dtype) - rows).t(), rows)
        self.sequences += sequences

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / self.sequences)


def asymmetric_weight(weight: torch.Tensor, hessian: torch.Tensor, gap: torch.Tensor,
                      percdamp: float = 0.01) -> torch.Tensor:
    """The weight W* that best reproduces the dense model's layer output from the pruned model's inputs:
    argmin over V of ||W X_dense - V X||^2 = W (X_dense X^T) H^-1 = W + W G H^-1, with H = X X^T and
    G = (X_dense - X) X^T (as Hessian and InputGap hold them). Then ||W X_dense - V X||^2 =
    ||W X_dense - W* X||^2 + tr((W* - V) H (W* - V)^T), so a method that minimises the second term for the
    target W* (SparseGPT, ADMM, ALPS) minimises the first.

    H is damped by percdamp * mean(diag H) in the correction only, and W* = W exactly when both models feed
    the layer the same inputs (every layer of the first block)."""
    compute = hessian.dtype
    w = weight.to(compute)
    difference = gap.to(compute)
    if not bool(difference.any()):
        return weight.clone()
    dead = torch.diagonal(hessian) == 0  # an input the pruned model never feeds: no correction can use it
    scale = torch.diagonal(hessian).mean().clamp_min(torch.finfo(compute).tiny)

    def attempt(damp):  # rounding can leave H barely indefinite: the shared escalation raises the damping
        damped = hessian.clone()
        diagonal = torch.diagonal(damped)
        diagonal += damp * scale
        diagonal[dead] = 1.0
        factor, info = torch.linalg.cholesky_ex(damped)
        return None if int(info) else factor

    factor, _ = escalating_damping(percdamp, 10.0, attempt)
    # W G H^-1 = (H^-1 (W G)^T)^T, H symmetric: one Cholesky solve for every output row.
    correction = torch.cholesky_solve((w @ difference).t(), factor).t()
    return (w + correction).to(weight.dtype)
