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
from ..methods.statistics import ActSqNorm
from ..methods.wanda import wanda_scores
from .owl import OWL_OPTIONS, outlier_ratio, owl_sparsities


@dataclass(frozen=True)
class Allocation:
    name: str
    allocate: Callable[..., dict]
    summary: str
    options: tuple[Option, ...] = ()
    statistic: Optional[type] = None  # what it reads from the dense model; None reads nothing
    accepts_nm: bool = True  # whether it can work with an N:M pattern (whose sparsity is fixed)
    accepts_structured: bool = True  # whether it can give a structured pattern (one removal for every block)

    def check_options(self, given: dict | None) -> dict:
        return check_options(f"allocation {self.name}", self.options, given)


def _uniform(layers: dict[str, int], target: float, pattern, statistics) -> dict[str, float]:
    return dict.fromkeys(layers, float(target))


def _owl(layers: dict[str, int], target: float, pattern, statistics, owl_m: float = 5.0,
         owl_lambda: float = 0.08) -> dict[str, float]:
    """OWL: one sparsity per block from its outlier ratio of Wanda scores on the dense model's activations;
    the parameter-weighted mean over blocks is the target."""
    from ..models import get_weight

    ratios, block_layers = [], []
    for _index, modules, act_sq_norms in statistics(ActSqNorm):
        scores = [wanda_scores(get_weight(module), act_sq_norms[name]) for name, module in modules.items()]
        ratios.append(outlier_ratio(scores, owl_m))
        block_layers.append(list(modules))
    weights = [sum(layers[f"{i}.{name}"] for name in names) for i, names in enumerate(block_layers)]
    sparsities = owl_sparsities(ratios, target, owl_lambda, weights=weights)
    return {f"{i}.{name}": sparsities[i] for i, names in enumerate(block_layers) for name in names}


ALLOCATIONS: dict[str, Allocation] = {
    "uniform": Allocation("uniform", _uniform, "every layer gets the target sparsity"),
    "owl": Allocation("owl", _owl, "outlier-weighed layer-wise sparsity (Yin et al., 2024): blocks with more "
                      "Wanda-score outliers keep more weights", options=OWL_OPTIONS, statistic=ActSqNorm,
                      accepts_nm=False, accepts_structured=False),
}


def check(spec, method, pattern) -> tuple[Allocation, dict, dict]:
    """(the allocation, the method's typed options, the allocation's typed options): each option goes to
    whichever of the method and the allocation declares it."""
    from ..settings import spelled

    allocation = get_allocation(spec.allocation)
    mine = {o.name for o in allocation.options}
    for name in spec.options:
        owner = next((a for a in ALLOCATIONS.values() if a is not allocation and name in {o.name for o in a.options}),
                     None)
        if owner is not None and name not in {o.name for o in method.options}:
            raise OptionError(f"{spelled('options')} {name} is an option of {spelled('allocation')} {owner.name}; "
                              f"add {spelled('allocation')} {owner.name} or leave it out")
    method_options = method.check_options({k: v for k, v in spec.options.items() if k not in mine})
    allocation_options = allocation.check_options({k: v for k, v in spec.options.items() if k in mine})
    if pattern.is_nm and not allocation.accepts_nm:
        raise OptionError(f"{spelled('allocation')} {allocation.name} gives layers different sparsities, which "
                          f"pattern {pattern} cannot (it fixes {pattern.sparsity:g}); use unstructured")
    return allocation, method_options, allocation_options


def get_allocation(name: str) -> Allocation:
    try:
        return ALLOCATIONS[name]
    except KeyError:
        raise OptionError(f"unknown allocation {name!r}; choose one of {', '.join(ALLOCATIONS)}") from None


__all__ = ["Allocation", "ALLOCATIONS", "check", "get_allocation", "OWL_OPTIONS", "outlier_ratio", "owl_sparsities"]
