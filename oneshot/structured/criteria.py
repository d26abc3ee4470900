"""The structured criteria (`--method` with a structured `--pattern`), and the checks that pair them.

A criterion scores whole units; which patterns it can score and what it reads are declared here, so
that the run's validation refuses a pairing that cannot apply in one line, before any work:
`--method sparsegpt --pattern heads`, `--method flap --pattern unstructured` or
`--method block-influence --pattern channels`. The maths is in scores.py and refit.py, the pass over
the model in driver.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..methods.masks import STRUCTURED_PATTERNS, Pattern, PatternError
from ..methods.options import Option, check_options

UNITS = ("heads", "channels", "width")  # patterns that remove units inside every block
ALL = ("layers",) + UNITS

RECONSTRUCT = Option("reconstruct", bool, False,
                     "refit o_proj / down_proj by least squares on the calibration activations after removal")
BIAS_COMPENSATION = Option("bias_compensation", bool, True,
                           "add W[:, removed] @ mean(x[removed]) to the consuming projection's bias (FLAP)")

# What a criterion reads: nothing, the consuming projections' inputs, gradients of the calibration
# loss (a backward pass through the whole model), or the hidden states between blocks.
WEIGHTS, ACTIVATIONS, GRADIENTS, HIDDEN = "weights", "activations", "gradients", "hidden states"


@dataclass(frozen=True)
class Criterion:
    name: str
    patterns: tuple[str, ...]
    reads: str
    summary: str
    source: str  # the paper it follows
    options: tuple[Option, ...] = ()

    @property
    def statistic(self):
        """Truthy when the criterion reads calibration data (the run API samples it then)."""
        return None if self.reads == WEIGHTS else self.reads

    def reads_calibration(self, options: dict) -> bool:
        return self.reads != WEIGHTS or bool(options.get("reconstruct"))

    def check_options(self, given: dict | None) -> dict:
        return check_options(f"method {self.name}", self.options, given)

    def options_for(self, structure: str) -> tuple[Option, ...]:
        """The options that mean something with `structure` (a refit needs units inside blocks)."""
        return tuple(o for o in self.options if structure in UNITS or o.name != "reconstruct")


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("magnitude", ALL, WEIGHTS,
              "units: L2 norms of the consuming projection's input columns; blocks: sum |W|",
              "Magnitude-sp (An et al., 2024); block magnitude (Kim et al., 2024)", (RECONSTRUCT,)),
    Criterion("wanda", UNITS, ACTIVATIONS,
              "mean over rows of |W_ij| * ||X_j||_2 at the consuming projection, summed per unit",
              "Wanda-sp (An et al., 2024)", (RECONSTRUCT,)),
    Criterion("flap", UNITS, ACTIVATIONS,
              "fluctuation Var(X_j) * ||W_:,j||^2 at the consuming projection, with bias compensation",
              "FLAP (An et al., 2024)", (RECONSTRUCT, BIAS_COMPENSATION)),
    Criterion("taylor", ALL, GRADIENTS,
              "sum of |w * dL/dw| over the unit's (or block's) weights",
              "LLM-Pruner element-wise first order (Ma et al., 2023); Taylor blocks (Kim et al., 2024)",
              (RECONSTRUCT,)),
    Criterion("gradient", ALL, GRADIENTS,
              "mean over sequences of |dL/dm| for a gate m on the unit's output (or the block's residual branch)",
              "head importance (Michel et al., 2019)", (RECONSTRUCT,)),
    Criterion("block-influence", ("layers",), HIDDEN,
              "1 - mean cosine similarity between a block's input and output",
              "ShortGPT (Men et al., 2024)"),
    Criterion("angular", ("layers",), HIDDEN,
              "remove the n consecutive blocks whose input and output (last token) are the closest in angle",
              "Gromov et al., 2024"),
)}


def _choices(pattern: str) -> str:
    return ", ".join(name for name, c in CRITERIA.items() if pattern in c.patterns)


def resolve_method(name: str, pattern: Pattern, methods: dict, method_flag: str = "--method",
                   pattern_flag: str = "--pattern"):
    """The method that `name` means with `pattern`: a Method from `methods` (unstructured and N:M
    patterns) or a Criterion (structured patterns). PatternError in one line when the pair cannot apply."""
    if name not in methods and name not in CRITERIA:
        raise PatternError(f"unknown method {name!r}; choose one of {', '.join(methods)} (unstructured, N:M) or "
                           f"{', '.join(CRITERIA)} ({', '.join(STRUCTURED_PATTERNS)})")
    if not pattern.is_structured:
        if name not in methods:
            raise PatternError(f"{method_flag} {name} removes whole units; give {pattern_flag} "
                               f"{' or '.join(CRITERIA[name].patterns)}, or choose one of {', '.join(methods)} "
                               f"for {pattern}")
        return methods[name]
    structure = pattern.structure
    criterion = CRITERIA.get(name)
    if criterion is None:
        does = "removes nothing" if name == "dense" else "zeroes weights and cannot choose units"
        raise PatternError(f"{method_flag} {name} {does} for {pattern_flag} {structure}; choose one of "
                           f"{_choices(structure)}")
    if structure not in criterion.patterns:
        what = "whole blocks" if criterion.patterns == ("layers",) else "heads and channels"
        raise PatternError(f"{method_flag} {name} scores {what}, not {structure}; for {pattern_flag} {structure} "
                           f"choose one of {_choices(structure)}")
    return criterion


def applies(name: str, pattern: Pattern, methods: dict) -> bool:
    """Whether `name` can run with `pattern` (a sweep skips the pairs that cannot)."""
    try:
        resolve_method(name, pattern, methods)
        return True
    except PatternError:
        return False


def check_structured_spec(criterion: Criterion, pattern: Pattern, options: dict, allocation: str,
                          checkpoint_dir, names) -> None:
    """The checks of a structured run's own values (no model yet); PatternError in one line."""
    if allocation != "uniform":
        raise PatternError(f"{names('allocation')} {allocation}: structured patterns remove the same number of "
                           "units from every block (so the model keeps one config); use uniform")
    if checkpoint_dir:
        raise PatternError(f"{names('checkpoint_dir')} resumes weight pruning block by block; a structured run "
                           "does not write one")
    if options.get("reconstruct") and pattern.structure == "layers":
        raise PatternError(f"{names('options')} reconstruct=true refits o_proj and down_proj after removing heads "
                           "or channels; pattern layers removes whole blocks and leaves nothing to refit")
