"""Per-layer sparsity: an allocation turns one target into a sparsity for every prunable layer.

An allocation declares its options like a method does, and is a function
    allocate(model, target, pattern, statistics, **options) -> {"block.layer": sparsity}
where `statistics(statistic_class)` streams the dense model's per-block statistics (only called by
allocations that read activations; it needs calibration data). `uniform` gives every layer the target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..methods.options import Option, OptionError, check_options


@dataclass(frozen=True)
class Allocation:
    name: str
    allocate: Callable[..., dict]
    summary: str
    options: tuple[Option, ...] = ()
    statistic: Optional[type] = None  # what it reads from the dense model; None reads nothing
    accepts_nm: bool = True  # whether it can work with an N:M pattern (whose sparsity is fixed)

    def check_options(self, given: dict | None) -> dict:
        return check_options(f"allocation {self.name}", self.options, given)


def _uniform(layers: dict[str, int], target: float, pattern, statistics) -> dict[str, float]:
    return dict.fromkeys(layers, float(target))


ALLOCATIONS: dict[str, Allocation] = {
    "uniform": Allocation("uniform", _uniform, "every layer gets the target sparsity"),
}


def get_allocation(name: str) -> Allocation:
    try:
        return ALLOCATIONS[name]
    except KeyError:
        raise OptionError(f"unknown allocation {name!r}; choose one of {', '.join(ALLOCATIONS)}") from None


__all__ = ["Allocation", "ALLOCATIONS", "get_allocation"]
