"""The pruning methods as pure tensor functions, and the registry the engine and the run API use.

Each method declares which input statistic it needs (or none) and its options (name, type, default,
range, next to its maths); the engine accumulates that statistic from each linear layer's inputs and
calls `prune(weight, statistic, sparsity, pattern, **options)`.

A method of your own, in your own package, joins the registry through the entry-point group
`oneshot.methods` (a `Method`, or a function returning one): it then appears in `--method`, run configs,
sweeps, reports and records like the built-in ones. docs/methods.md#your-own-method has a complete example.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .admm import ADMM_OPTIONS, AdmmHessian, admm_prune, prepare_admm
from .alps import ALPS_OPTIONS, AlpsHessian, alps_prune, prepare_alps
from .dsnot import DSNOT_OPTIONS, DSnoTStatistic, dsnot_configure, dsnot_per_layer, dsnot_prune, prepare_dsnot
from .magnitude import magnitude_prune
from .masks import PatternError, Pattern, PruneResult, check_sparsity, parse_pattern
from .numerics import NumericsError
from .options import Option, OptionError, check_options
from .ria import RIA_OPTIONS, ria_prune
from .sparsegpt import SPARSEGPT_OPTIONS, InverseHessian, prepare_hessian, sparsegpt_prune
from .statistics import ActSqNorm, Hessian
from .wanda import wanda_prune
from .wandapp import WANDAPP_OPTIONS, WANDAPP_STAGES, wandapp_prune


@dataclass(frozen=True)
class Method:
    name: str
    statistic: Optional[type]  # accumulator class fed with layer inputs; None needs no calibration
    prune: Callable[..., PruneResult]  # (weight, prepared statistic or None, sparsity, pattern, **options)
    summary: str
    # Work done once per statistic, shared by every layer reading the same input: (value, **options).
    prepare: Optional[Callable] = None
    options: tuple[Option, ...] = ()
    # What a layer no calibration token reached gets: (weight, sparsity, pattern) -> PruneResult.
    # None: magnitude pruning (engine/stages.py, NO_TOKENS_NOTE).
    without_data: Optional[Callable] = None
    # False for the baseline: a method that leaves every weight as it is.
    prunes: bool = True
    # The block visit's whole stage sequence (functions of engine.stages.BlockVisit) for a method that needs
    # more than per-layer statistics (Wanda++: a block's gradients and outputs). None: the engine's default.
    stages: Optional[tuple] = None
    # The options for one layer, from its name inside the block (DSnoT's skip_layer): (name, options) -> options.
    per_layer: Optional[Callable[[str, dict], dict]] = None
    # This method as a run's options need it (DSnoT gathers the Hessian only for base sparsegpt): (method, options)
    # -> Method, applied once per run (plan.py). None: as it is.
    configure: Optional[Callable] = None
    # Its objective is the layer's output error tr((W - V) H (W - V)^T), H its statistic (Hessian): it may then be
    # handed another weight to reconstruct (--asymmetric: the one that best gives the dense model's output).
    reconstructs: bool = False

    def check_options(self, given: dict | None) -> dict:
        """The given options, typed; OptionError (one line naming the allowed ones) for anything else."""
        return check_options(f"method {self.name}", self.options, given)


def _unchanged(weight, _statistic, _sparsity, _pattern):
    return PruneResult(weight, weight == 0, {})


METHODS = {
    "dense": Method("dense", None, _unchanged, "no pruning: the model as it is", prunes=False),
    "magnitude": Method(
        "magnitude", None, lambda w, _stat, p, pattern: magnitude_prune(w, p, pattern),
        "drop the smallest |W|; one threshold per matrix",
    ),
    "wanda": Method(
        "wanda", ActSqNorm, wanda_prune,
        "drop the smallest |W|*||X||_2 within each output row",
    ),
    "sparsegpt": Method(
        "sparsegpt", Hessian, sparsegpt_prune,
        "OBS reconstruction with the inverse Hessian, lazy block updates, adaptive masks",
        prepare=prepare_hessian, options=SPARSEGPT_OPTIONS, reconstructs=True,
    ),
    "admm": Method(
        "admm", Hessian, admm_prune,
        "ADMM layer reconstruction (Boza 2024; ALPS): ridge solves with the Hessian, mask phased in",
        prepare=prepare_admm, options=ADMM_OPTIONS, reconstructs=True,
    ),
    "dsnot": Method(
        "dsnot", DSnoTStatistic, dsnot_prune,
        "DSnoT: the base's mask (wanda | magnitude | sparsegpt) refined by swaps that cut each row's expected error",
        prepare=prepare_dsnot, options=DSNOT_OPTIONS, per_layer=dsnot_per_layer,
        configure=dsnot_configure,
    ),
    "alps": Method(
        "alps", Hessian, alps_prune,
        "ALPS (Meng et al. 2024): ADMM with an adaptive penalty until the support settles, then a CG refit",
        prepare=prepare_alps, options=ALPS_OPTIONS, reconstructs=True,
    ),
    "ria": Method(
        "ria", ActSqNorm, ria_prune,
        "RIA: drop the smallest relative importance times ||X||_2^a; N:M with optional channel permutation",
        options=RIA_OPTIONS,
    ),
    "wanda++": Method(
        "wanda++", ActSqNorm, wandapp_prune,
        "Wanda++: |W|*(||X||_2 + alpha*G) with block-level gradients G, then regional optimisation of each block",
        options=WANDAPP_OPTIONS, stages=WANDAPP_STAGES,
    ),
}


ENTRY_POINTS = "oneshot.methods"
PLUGIN_ERRORS: dict[str, str] = {}  # entry point name -> why it could not be loaded
PLUGIN_PACKAGES: dict[str, str] = {}  # distribution that provided a loaded plugin method -> its version


def register(method: Method, origin: str = "") -> Method:
    """Add `method` to the registry (a plugin's, or one made in Python); a name taken is refused."""
    if not isinstance(method, Method):
        raise OptionError(f"{origin or 'register'}: {method!r} is not a oneshot.methods.Method")
    if method.name in METHODS and METHODS[method.name] is not method:
        raise OptionError(f"{origin or 'register'}: a method named {method.name!r} exists already; choose another name")
    METHODS[method.name] = method
    return method


def _load_plugins() -> None:
    """Methods other packages declare under the entry-point group `oneshot.methods`. One that fails to load
    is left out and named when a run asks for it; it never breaks the others."""
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINTS):
        try:
            loaded = point.load()
            method = loaded() if callable(loaded) and not isinstance(loaded, Method) else loaded
            register(method, f"entry point {point.name} ({point.value})")
            if getattr(point, "dist", None) is not None:  # its numbers depend on its code: every record names the package
                PLUGIN_PACKAGES[point.dist.name] = point.dist.version
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported when it is asked for
            PLUGIN_ERRORS[point.name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        if name in PLUGIN_ERRORS:
            raise PatternError(f"method {name!r} is a plugin ({ENTRY_POINTS} entry point) that failed to load: "
                               f"{PLUGIN_ERRORS[name]}") from None
        raise PatternError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def is_baseline(name: str) -> bool:
    """Whether `name` is a registered method that prunes nothing (the unpruned baseline)."""
    method = METHODS.get(name) if isinstance(name, str) else None
    return method is not None and not method.prunes


_load_plugins()

__all__ = [
    "METHODS", "Method", "register", "ENTRY_POINTS", "PLUGIN_ERRORS", "get_method", "is_baseline", "Pattern", "PatternError", "PruneResult", "NumericsError",
    "Option", "OptionError", "check_options", "parse_pattern", "check_sparsity", "magnitude_prune", "wanda_prune",
    "sparsegpt_prune", "prepare_hessian", "InverseHessian", "SPARSEGPT_OPTIONS", "admm_prune", "prepare_admm",
    "ADMM_OPTIONS", "AdmmHessian", "Hessian", "ActSqNorm",
    "WANDAPP_OPTIONS", "WANDAPP_STAGES", "wandapp_prune",
    "ALPS_OPTIONS", "AlpsHessian", "alps_prune", "prepare_alps",
    "RIA_OPTIONS", "ria_prune",
]
