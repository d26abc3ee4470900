"""The quantisation grid: integer codes with one scale (and zero point) per group of inputs.

A weight W [outputs, inputs] is cut along its inputs into groups of `group_size` columns (None: the
whole row is one group, "per channel"). Each (row, group) has a scale s and an integer zero point z;
a value x is stored as the code c = clamp(round(x / s) + z, lo, hi) and read back as (c - z) * s.

- symmetric: z = 0, codes in [-2^(b-1), 2^(b-1) - 1], s = max|x| / (2^(b-1) - 1);
- asymmetric: codes in [0, 2^b - 1], the range [min(x, 0), max(x, 0)] spread over them, z = round(-min / s).

Zero always lies on the grid (code z reads back as exactly 0), so a pruned weight stays exactly 0.
`scale_dtype` rounds every scale to the dtype a format stores it in (GGUF: float16), so that the
file holds exactly the values the model in memory used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError

BITS = {"int8": 8, "int4": 4}


class QuantizationError(UsageError):
    """A quantisation setting the model cannot take (a group size that does not divide a layer)."""


def check_group_size(model, grid: "Grid", flag: str = "--group-size") -> None:
    """Every prunable layer's input width must be a multiple of the group size (packed formats and
    their kernels need whole groups)."""
    from ..models import decoder_blocks, get_weight, prunable_layers

    if grid.group_size is None:
        return
    for block in decoder_blocks(model):
        for name, layer in prunable_layers(block).items():
            width = get_weight(layer).shape[1]
            if width % grid.group_size:
                raise QuantizationError(f"{flag} {grid.group_size} does not divide the {width} inputs of layer {name}; "
                                        f"choose a divisor of {width} such as {_divisor_hint(width, grid.group_size)}")


def _divisor_hint(width: int, size: int) -> int:
    divisors = [d for d in (256, 128, 64, 32, 16, 8) if width % d == 0]
    return min(divisors, key=lambda d: abs(d - size)) if divisors else width


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int | None = None  # inputs per group; None: one group per output row
    symmetric: bool = False
    scale_dtype: torch.dtype | None = None  # round scales to this storage dtype

    @property
    def code_range(self) -> tuple[int, int]:
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size is None else -(-columns // self.group_size)

    def params(self, values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of the values reduced over `dim` (kept, for broadcasting); zero is integral."""
        lo_code, hi_code = self.code_range
        if self.symmetric:
            scale = values.abs().amax(dim, keepdim=True) / hi_code
            zero = torch.zeros_like(scale)
        else:
            low = values.amin(dim, keepdim=True).clamp(max=0)
            high = values.amax(dim, keepdim=True).clamp(min=0)
            scale = (high - low) / (hi_code - lo_code)
        scale = self._stored(scale)
        if not self.symmetric:
            zero = torch.clamp(torch.round(-low / scale), lo_code, hi_code)
        return scale, zero

    def _stored(self, scale: torch.Tensor) -> torch.Tensor:
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale reads 0
        if self.scale_dtype is not None:
            tiny = torch.finfo(self.scale_dtype).tiny
            scale = scale.clamp(min=tiny).to(self.scale_dtype).to(scale.dtype)
        return scale

    def codes(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        lo_code, hi_code = self.code_range
        return torch.clamp(torch.round(x / scale) + zero, lo_code, hi_code)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (codes - zero) * scale

    def round(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """x moved to the nearest grid value (the quantised value, in x's dtype)."""
        return self.dequantize(self.codes(x, scale, zero), scale, zero)

    def describe(self) -> str:
        group = "per channel" if self.group_size is None else f"groups of {self.group_size}"
        return f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric'}, {group}"


@dataclass
class QuantizedWeight:
    """What export needs besides the (dequantised) weight: the grid and each (row, group)'s scale and
    zero point, [outputs, groups] on the CPU. Codes are recovered exactly as round(W / s) + z."""

    grid: Grid
    scale: torch.Tensor
    zero: torch.Tensor

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes [outputs, inputs] of a weight that lies on this grid."""
        scale, zero = self.expanded(weight.shape[1])
        return self.grid.codes(weight.to(scale.dtype), scale, zero).to(torch.int32)

    def expanded(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero repeated to one entry per weight column."""
        size = columns if self.grid.group_size is None else self.grid.group_size
        return (self.scale.repeat_interleave(size, 1)[:, :columns], self.zero.repeat_interleave(size, 1)[:, :columns])


def rtn(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, QuantizedWeight]:
    """Round to nearest: each group's scale from its own values (zeros included), every entry rounded.
    Zeros (pruned weights) stay exactly zero. Returns (quantised weight in weight's dtype, params)."""
    from ..methods.masks import compute_dtype

    W = weight.detach().to(compute_dtype(weight.dtype))
    rows, cols = W.shape
    size = cols if grid.group_size is None else grid.group_size
    groups = grid.groups(cols)
    padded = torch.nn.functional.pad(W, (0, groups * size - cols)).reshape(rows, groups, size)
    scale, zero = grid.params(padded, dim=2)
    quantised = grid.round(padded, scale, zero).reshape(rows, groups * size)[:, :cols]
    quantised = quantised.masked_fill(W == 0, 0)
    return quantised.to(weight.dtype), QuantizedWeight(grid, scale[..., 0].cpu(), zero[..., 0].cpu())
