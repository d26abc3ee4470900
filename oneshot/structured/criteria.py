"""The structured criteria (`--method` with a structured `--pattern`), and the checks that pair them.

A criterion scores whole units; which patterns it can score, what it reads, how it turns that into
scores and what it puts back after removal are declared here, so that the run's validation refuses a
pairing that cannot apply in one line, before any work (`--method sparsegpt --pattern heads`,
`--method flap --pattern unstructured` or `--method block-influence --pattern channels`), and the
pass over the model (driver.py) follows the declarations without naming a criterion. The maths is in
scores.py and refit.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..methods import is_baseline
from ..methods.masks import STRUCTURED_PATTERNS, Pattern, PatternError
from ..methods.options import Option, check_options
from . import scores as S

UNITS = ("heads", "channels", "width")  # patterns that remove units inside every block
ALL = ("layers",) + UNITS
EXPERTS = ("experts",)  # removes whole routed experts from every mixture-of-experts block

RECONSTRUCT = Option("reconstruct", bool, False,
                     "refit o_proj / down_proj by least squares on the calibration activations after removal")
CHANNEL_MULTIPLE = Option("channel_multiple", int, 1,
                          "keep a multiple of this many MLP channels per block: 32 for llama.cpp's Q4_0/Q8_0 blocks "
                          "(--quantize with group_size 32), 256 for its K-quants", minimum=1)
BIAS_COMPENSATION = Option("bias_compensation", bool, True,
                           "add W[:, removed] @ mean(x[removed]) to the consuming projection's bias (FLAP)")

# What a criterion reads: nothing, the consuming projections' inputs, gradients of the calibration
# loss (a backward pass through the whole model), the hidden states between blocks, or the routing of
# every MoE block (the router's logits, its top-k choices and weights, and each routed expert's outputs).
WEIGHTS, ACTIVATIONS, GRADIENTS, HIDDEN = "weights", "activations", "gradients", "hidden states"
ROUTING = "routing"


# ---- scoring units inside a block: (consuming projection's weight [outputs, inputs], the moments of its
# inputs (moments.ChannelMoments, or None when the criterion reads only weights), index [units, width]) -> scores

def _magnitude_units(weight: torch.Tensor, _moments, index: torch.Tensor) -> torch.Tensor:
    return S.magnitude_sp(weight, index)


def _wanda_units(weight: torch.Tensor, moments, index: torch.Tensor) -> torch.Tensor:
    return S.wanda_sp(weight, moments.sq_norm, index)


def _flap_units(weight: torch.Tensor, moments, index: torch.Tensor) -> torch.Tensor:
    return S.flap(weight, moments.variance, index)


# ---- choosing whole blocks: (what the criterion reads for the whole model, how many blocks to remove) ->
# (the removed blocks' indices, the scores recorded). What it reads, by `reads`: WEIGHTS, each block's linear
# weights; GRADIENTS, passes.first_order's per-block {"blocks": score}; HIDDEN, passes.hidden_states's
# (influence per block, last-token states).

def _lowest_blocks(scores: list[float], count: int) -> tuple[list[int], list[float]]:
    return S.lowest(torch.tensor(scores, dtype=torch.float64), count), scores


def _magnitude_blocks(weights_per_block, count: int):
    return _lowest_blocks([S.block_magnitude(weights) for weights in weights_per_block], count)


def _first_order_blocks(per_block: list[dict], count: int):
    return _lowest_blocks([float(block["blocks"]) for block in per_block], count)


def _influence_blocks(hidden, count: int):
    influence, _states = hidden
    return S.lowest(influence, count), influence.tolist()


def _angular_blocks(hidden, count: int):
    _influence, states = hidden
    first = S.angular_window(states, count) if count else 0
    scores = [float(S.angular_distance(states[i], states[i + max(count, 1)]).mean())
              for i in range(len(states) - max(count, 1))]
    return list(range(first, first + count)), scores


# ---- routed experts: (experts.RoutingStats of one MoE block) -> one score per routed expert

def _frequency_experts(stats) -> torch.Tensor:
    return stats.counts.to(torch.float64)


def _reap_experts(stats) -> torch.Tensor:
    return S.reap(stats.weighted_norms, stats.counts)


def _router_logit_experts(stats) -> torch.Tensor:
    return stats.probabilities / max(stats.tokens, 1)


@dataclass(frozen=True)
class Criterion:
    name: str
    patterns: tuple[str, ...]
    reads: str
    summary: str
    source: str  # the paper it follows
    options: tuple[Option, ...] = ()
    # Units inside blocks: (weight, moments, index) -> one score per unit, as above. None: the scores
    # come from the backward pass (reads GRADIENTS).
    unit_score: Optional[Callable] = None
    # Whole blocks: (what it reads, count) -> (removed, scores), as above. None: it cannot score blocks.
    choose_blocks: Optional[Callable] = None
    # After removing inputs of a consuming projection, its bias gains W[:, removed] @ mean(x[removed])
    # (unless the option bias_compensation=false, or a least-squares refit replaces it).
    compensates_bias: bool = False
    # The input statistics come from the unpruned model (each block's inputs as the dense model computes
    # them), not from the upstream blocks as already pruned.
    dense_statistics: bool = False
    # Routed experts: (experts.RoutingStats of one MoE block) -> one score per expert. None: not experts.
    expert_score: Optional[Callable] = None

    @property
    def statistic(self):
        """Truthy when the criterion reads calibration data (the run API samples it then)."""
        return None if self.reads == WEIGHTS else self.reads

    def reads_calibration(self, options: dict) -> bool:
        return self.reads != WEIGHTS or bool(options.get("reconstruct"))

    def check_options(self, given: dict | None) -> dict:
        return check_options(f"method {self.name}", self.options, given)

    def bias_compensation(self, options: dict) -> bool:
        """Whether this run puts the removed inputs' mean into the consuming projection's bias."""
        return self.compensates_bias and bool(options.get(BIAS_COMPENSATION.name, BIAS_COMPENSATION.default))

    def options_for(self, structure: str) -> tuple[Option, ...]:
        """The options that mean something with `structure` (a refit needs units inside blocks)."""
        return tuple(o for o in self.options if structure in UNITS or o.name not in ("reconstruct", "channel_multiple"))


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("magnitude", ALL, WEIGHTS,
              "units: L2 norms of the consuming projection's input columns; blocks: sum |W|",
              "Magnitude-sp (An et al., 2024); block magnitude (Kim et al., 2024)", (RECONSTRUCT, CHANNEL_MULTIPLE),
              unit_score=_magnitude_units, choose_blocks=_magnitude_blocks),
    Criterion("wanda", UNITS, ACTIVATIONS,
              "mean over rows of |W_ij| * ||X_j||_2 at the consuming projection, summed per unit",
              "Wanda-sp (An et al., 2024)", (RECONSTRUCT, CHANNEL_MULTIPLE), unit_score=_wanda_units),
    Criterion("flap", UNITS, ACTIVATIONS,
              "fluctuation Var(X_j) * ||W_:,j||^2 at the consuming projection, with bias compensation",
              "FLAP (An et al., 2024)", (RECONSTRUCT, BIAS_COMPENSATION, CHANNEL_MULTIPLE), unit_score=_flap_units,
              compensates_bias=True, dense_statistics=True),  # the authors' code reads the dense model
    Criterion("taylor", ALL, GRADIENTS,
              "sum of |w * dL/dw| over the unit's (or block's) weights",
              "LLM-Pruner element-wise first order (Ma et al., 2023); Taylor blocks (Kim et al., 2024)",
              (RECONSTRUCT, CHANNEL_MULTIPLE), choose_blocks=_first_order_blocks),
    Criterion("gradient", ALL, GRADIENTS,
              "mean over sequences of |dL/dm| for a gate m on the unit's output (or the block's residual branch)",
              "head importance (Michel et al., 2019)", (RECONSTRUCT, CHANNEL_MULTIPLE), choose_blocks=_first_order_blocks),
    Criterion("block-influence", ("layers",), HIDDEN,
              "1 - mean cosine similarity between a block's input and output",
              "ShortGPT (Men et al., 2024)", choose_blocks=_influence_blocks),
    Criterion("angular", ("layers",), HIDDEN,
              "remove the n consecutive blocks whose input and output (last token) are the closest in angle",
              "Gromov et al., 2024", choose_blocks=_angular_blocks),
    Criterion("frequency", EXPERTS, ROUTING,
              "how many calibration tokens the router sends to the expert (among its top-k)",
              "expert activation frequency, the REAP paper's frequency baseline (CerebrasResearch/reap "
              "prune_method frequency: expert_frequency)", expert_score=_frequency_experts),
    Criterion("reap", EXPERTS, ROUTING,
              "mean over the tokens routed to the expert of its routing weight times the L2 norm of its output",
              "REAP, router-weighted expert activation pruning (Lasby et al., ICLR 2026; CerebrasResearch/reap)",
              expert_score=_reap_experts),
    Criterion("router-logit", EXPERTS, ROUTING,
              "mean over all calibration tokens of the router's softmax probability for the expert",
              "a router-only baseline; the REAP code's nearest is weighted_frequency_sum, the routing "
              "weights summed over routed tokens only", expert_score=_router_logit_experts),
)}


def _choices(pattern: str) -> str:
    return ", ".join(name for name, c in CRITERIA.items() if pattern in c.patterns)


def resolve_method(name: str, pattern: Pattern, methods: dict, method_flag: str = "--method",
                   pattern_flag: str = "--pattern"):
    """The method that `name` means with `pattern`: a Method from `methods` (unstructured and N:M
    patterns) or a Criterion (structured patterns). PatternError in one line when the pair cannot apply."""
    if name not in methods and name not in CRITERIA:
        from ..methods import PLUGIN_ERRORS

        if name in PLUGIN_ERRORS:  # a plugin's own failure says more than "unknown"
            raise PatternError(f"method {name!r} is a plugin that failed to load: {PLUGIN_ERRORS[name]}")
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
        does = "removes nothing" if is_baseline(name) else "zeroes weights and cannot choose units"
        raise PatternError(f"{method_flag} {name} {does} for {pattern_flag} {structure}; choose one of "
                           f"{_choices(structure)}")
    if structure not in criterion.patterns:
        what = {("layers",): "whole blocks", EXPERTS: "routed experts"}.get(criterion.patterns, "heads and channels")
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
