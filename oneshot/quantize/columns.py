"""Quantisation inside the OBS column sweep: GPTQ (Frantar et al., 2023) and SparseGPT's joint mode.

Both reuse SparseGPT's column loop (methods/sparsegpt.py) with a per-column hook. Column j, once its
pruned entries are set to zero, is moved onto the grid; its error (w - q) / U_jj is spread over the
columns not yet visited through the Cholesky factor U of H^-1, exactly as a pruning error is.

- joint: SparseGPT selects the mask (adaptive N:M, or per block for unstructured) and each column is
  masked and quantised in one step, so later columns compensate for both errors.
- gptq: the weights are already pruned; the mask is fixed to their zeros and the sweep only quantises.
  A pruned entry that later columns' updates moved off zero is set back to zero at its turn and that
  error is propagated too (it is an OBS pruning step), so every pruned weight ends exactly at zero.

Group parameters are found at each group's first column from the weights as updated so far, with
the entries already known to be pruned counted as zeros; a group never straddles two blocks, so the
block's updates are all in. Per-channel parameters come from the whole row before the sweep.
"""
from __future__ import annotations

import math

import torch

from ..methods.masks import UNSTRUCTURED, Pattern
from ..methods.sparsegpt import InverseHessian, sparsegpt_prune
from .grid import Grid, QuantizedWeight


class ColumnQuantizer:
    """The per-column hook for sparsegpt_prune: keeps each group's scale and zero point."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.scale = self.zero = None  # [groups, rows]

    def start(self, Wt: torch.Tensor, blocksize: int, m: int = 0) -> int:
        cols, rows = Wt.shape
        self.scale = torch.ones(self.grid.groups(cols), rows, dtype=Wt.dtype, device=Wt.device)
        self.zero = torch.zeros_like(self.scale)
        if self.grid.group_size is None:
            scale, zero = self.grid.params(Wt, dim=0)
            self.scale[0], self.zero[0] = scale[0], zero[0]
            step = max(m, 1)
        else:
            step = math.lcm(self.grid.group_size, max(m, 1))
        return max(step, blocksize - blocksize % step)

    def __call__(self, j: int, rest: torch.Tensor, mask_rest: torch.Tensor) -> torch.Tensor:
        size = self.grid.group_size
        group = 0 if size is None else j // size
        if size is not None and j % size == 0:
            values = rest[:size].masked_fill(mask_rest[:size], 0)
            scale, zero = self.grid.params(values, dim=0)
            self.scale[group], self.zero[group] = scale[0], zero[0]
        q = self.grid.round(rest[0], self.scale[group], self.zero[group])
        return q.masked_fill(mask_rest[0], 0)

    def result(self) -> QuantizedWeight:
        return QuantizedWeight(self.grid, self.scale.t().contiguous().cpu(), self.zero.t().contiguous().cpu())


def joint_prune_quantize(weight: torch.Tensor, inverse: InverseHessian | torch.Tensor, sparsity: float,
                         pattern: Pattern, grid: Grid, **sparsegpt_options):
    """SparseGPT with each column masked and quantised in the sweep. Returns (PruneResult, params)."""
    quantizer = ColumnQuantizer(grid)
    result = sparsegpt_prune(weight, inverse, sparsity, pattern, quantize_column=quantizer, **sparsegpt_options)
    return result, quantizer.result()


def gptq(weight: torch.Tensor, inverse: InverseHessian | torch.Tensor, grid: Grid, blocksize: int = 128,
         **sparsegpt_options):
    """GPTQ on a (possibly pruned) weight: its zeros stay zero. Returns (quantised weight, params)."""
    quantizer = ColumnQuantizer(grid)
    options = {k: v for k, v in sparsegpt_options.items() if k in ("percdamp", "max_percdamp")}
    result = sparsegpt_prune(weight, inverse, 0.0, UNSTRUCTURED, blocksize=blocksize, kernel="torch",
                             quantize_column=quantizer, fixed_mask=weight == 0, **options)
    return result.weight, quantizer.result()
