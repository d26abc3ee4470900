"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): refine a base mask without changing any
kept weight.

Per output row i, pruning input j moves the row's output, summed over the tokens of a sequence, by
D_ij = W_ij * xsum_j, where xsum_j = (1/N) sum over tokens of x_j (the input's per-sequence sum, averaged
over the N calibration sequences). The row's expected reconstruction error is e_i = sum over pruned j of D_ij.
DSnoT then repeats, for at most `max_cycle_time` cycles and while |e_i| > `update_threshold`:

- grow one pruned weight: the pruned entries are ranked by D_ij / var_j^`pow_of_var_regrowing` (var_j: the
  input's variance within a sequence); with e_i > 0 the next from the top of that ranking, else the next
  from the bottom (its D has the sign of e, so growing it shrinks |e|);
- prune one kept weight: unstructured, the kept entries whose D has the sign opposite to e_i, in the order
  of increasing Wanda score (|W| * ||X||_2); N:M, the kept entry of the grown weight's group with the
  lowest base score, so every group keeps its count;
- swap them and update e_i. N:M (always) and unstructured with `without_same_sign=False` also stop the
  row when the swap would flip the sign of e_i.

Each row keeps its number of pruned weights (each N:M group its N); kept weights keep their values.

The base method gives the initial mask through its score, ranked within each row (unstructured) or each
group (N:M), as the authors' code does for every base: Wanda |W| * ||X||_2 (its own mask); magnitude |W|
(ranked per row, not with one threshold per matrix); SparseGPT w^2 / [U_jj]^2 with U = chol(H^-1), upper,
on the original weights: the authors never run SparseGPT's reconstruction, and neither does this.

This is the authors' algorithm (zyxxmu/DSnoT, lib/prune.py, prune_DSnoT), written here from its
description. Where a row's next step is not a swap of one pruned and one kept weight (its pointers have run
past the end of a ranking: in rows with fewer pruned weights of one sign, or kept weights, than the cycles
run), their code grows a weight already kept, prunes one already pruned (also in rows that have stopped), or
indexes past the end; here the row stops, so every row keeps its count and every N:M group its N.
docs/methods.md#dsnot has the details and the comparison with their code.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .masks import Pattern, PruneResult, compute_dtype, nm_mask, row_mask
from .options import Option, defaults
from .sparsegpt import InverseHessian, prepare_hessian
from .statistics import ActSqNorm, Hessian, _as_rows
from .wanda import wanda_scores

BASES = ("wanda", "magnitude", "sparsegpt")
SKIP_LAYERS = ("no_skip", "mlp", "self_attn")

DSNOT_OPTIONS = (
    Option("base", str, "wanda", "the method whose score gives the initial mask, ranked per row (per N:M group): "
           "wanda | magnitude | sparsegpt (its saliency w^2/[U_jj]^2, no weight update)", choices=BASES),
    Option("max_cycle_time", int, 50, "at most this many grow-and-prune swaps per row", minimum=0),
    Option("update_threshold", float, 0.1, "a row stops once |its expected reconstruction error| is at most "
           "this (in units of the layer's output summed over a sequence)", minimum=0.0),
    Option("pow_of_var_regrowing", float, 1.0, "the power of the input variance that divides the growing "
           "score (0: no variance term)", minimum=0.0, maximum=8.0),
    Option("skip_layer", str, "mlp", "leave these layers with the base mask: mlp (every layer outside "
           "attention) | self_attn | no_skip", choices=SKIP_LAYERS),
    Option("skip_sub_layer", str, "no_skip", "also leave the layers with this name (the last part of the "
           "layer's name, e.g. q_proj or down_proj) with the base mask; no_skip: none"),
    Option("without_same_sign", bool, True, "unstructured: swap even when it flips the sign of the row's "
           "error (N:M never does)"),
    Option("without_dsnot", bool, False, "keep the base mask everywhere (the base score ranked per row)"),
    Option("percdamp", float, 0.01, "base sparsegpt: damping, as a fraction of mean(diag H)", above=0.0),
)


# ---- the statistic: one pass over a layer's inputs ----------------------------------------------------------

class DSnoTInputs(NamedTuple):
    act_sq_norm: torch.Tensor  # (1/N) sum over tokens of x_j^2: Wanda's statistic
    input_sum: torch.Tensor  # (1/N) sum over tokens of x_j
    input_var: torch.Tensor  # variance of x_j within a sequence (biased), averaged over tokens
    hessian: torch.Tensor | None  # (2/N) X X^T, for base sparsegpt; None otherwise


class DSnoTStatistic:
    """What DSnoT reads from a layer's inputs: Wanda's squared norms, the per-sequence sum and variance of
    each input feature, and SparseGPT's Hessian when the base needs it (the class attribute `hessian`).

    The variance is each sequence's (about its own mean), weighted by its tokens, as the authors' wrapped
    layer keeps it. Inputs handed over flattened ([tokens, features], as OPT's MLP) are split evenly into
    the given number of sequences; where they do not divide (tokens routed to an expert), the chunk's
    tokens count as one group.
    """

    hessian = True

    def __init__(self, features: int, device, dtype: torch.dtype = torch.float32):
        self.norms = ActSqNorm(features, device, dtype)
        self.gram = Hessian(features, device, dtype) if self.hessian else None
        self.sum = torch.zeros(features, dtype=self.norms.sum.dtype, device=device)
        self.var_sum = torch.zeros_like(self.sum)
        self.var_tokens = 0

    @property
    def tokens(self) -> int:
        return self.norms.tokens

    def add(self, x: torch.Tensor, sequences: int | None = None) -> None:
        self.norms.add(x, sequences)
        if self.gram is not None:
            self.gram.add(x, sequences)
        rows, sequences = _as_rows(x, sequences)
        if not rows.shape[0]:
            return
        rows = rows.to(self.sum.dtype)
        if x.dim() > 2:
            groups = rows.reshape(-1, x.shape[-2], rows.shape[-1])
        elif sequences and rows.shape[0] % sequences == 0:
            groups = rows.reshape(sequences, -1, rows.shape[-1])
        else:
            groups = rows[None]
        self.sum += rows.sum(0)
        self.var_sum += groups.var(1, unbiased=False).sum(0) * groups.shape[1]
        self.var_tokens += rows.shape[0]

    def value(self) -> DSnoTInputs:
        return DSnoTInputs(self.norms.value(), self.sum / self.norms.sequences, self.var_sum / self.var_tokens,
                           self.gram.value() if self.gram is not None else None)


class DSnoTStatisticNoHessian(DSnoTStatistic):
    hessian = False


def statistic_for(base: str) -> type:
    return DSnoTStatistic if base == "sparsegpt" else DSnoTStatisticNoHessian


class Prepared(NamedTuple):
    inputs: DSnoTInputs
    inverse: InverseHessian | None  # base sparsegpt: the damped inverse factor


def prepare_dsnot(value: DSnoTInputs, base: str = "wanda", percdamp: float = 0.01, **_options) -> Prepared:
    """Once per shared statistic: SparseGPT's inverse factor for base sparsegpt."""
    if base == "sparsegpt":
        if value.hessian is None:
            raise ValueError("dsnot with base sparsegpt needs the Hessian in its statistic")
        return Prepared(value, prepare_hessian(value.hessian, percdamp))
    return Prepared(value, None)


# ---- the base's score --------------------------------------------------------------------------------------

def base_scores(base: str, weight: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """The base method's saliency of each weight (lower is pruned first), in the compute dtype."""
    inputs = prepared.inputs
    if base == "wanda":
        return wanda_scores(weight, inputs.act_sq_norm)
    if base == "magnitude":
        return weight.abs().to(compute_dtype(weight.dtype))
    if base == "sparsegpt":
        upper = prepared.inverse.upper
        w = weight.to(compute_dtype(weight.dtype, upper.dtype)).masked_fill(prepared.inverse.dead[None, :], 0)
        return w ** 2 / torch.diag(upper).to(w.dtype).reshape(1, -1) ** 2
    raise ValueError(f"unknown base {base!r}")


# ---- the refinement ----------------------------------------------------------------------------------------

def _pointer_step(pointers: torch.Tensor, side: torch.Tensor) -> None:
    """Move each row's pointer on `side` (0: the front, forwards; 1: the back, backwards) by one."""
    pointers.scatter_add_(1, side, 1 - 2 * side)


def _signed_order(values: torch.Tensor) -> torch.Tensor:
    """Positions into each row of `values`: first those with values < 0 in increasing position, last those
    with values > 0 in decreasing position; any slots between them (values == 0) hold position 0, as the
    authors' ordering does."""
    n = values.shape[1]
    position = torch.arange(n, device=values.device).expand_as(values)
    negative, positive = values < 0, values > 0
    front = torch.sort(torch.where(negative, position, n), dim=1).values
    back = torch.sort(torch.where(positive, position, n), dim=1).values.flip(1)
    return torch.where(front < n, front, 0) + torch.where(back < n, back, 0)


def dsnot_refine(weight: torch.Tensor, mask: torch.Tensor, input_sum: torch.Tensor, input_var: torch.Tensor,
                 prune_score: torch.Tensor, pattern: Pattern, max_cycle_time: int = 50,
                 update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0,
                 without_same_sign: bool = True) -> tuple[torch.Tensor, int]:
    """The refined mask (True: pruned) and the number of swaps made. `mask` is the base mask with the same
    number pruned in each row (N in each N:M group); `prune_score` orders the kept weights for pruning:
    Wanda's score for unstructured, the base's score for N:M (as in the authors' code)."""
    dtype = compute_dtype(weight.dtype, input_sum.dtype)
    rows, cols = weight.shape
    mask = mask.clone()
    effect = weight.to(dtype) * input_sum.to(dtype).reshape(1, -1)  # D: the pruned weight's effect on the output
    grow_score = effect.masked_fill(~mask, 0)
    error = grow_score.sum(dim=1, keepdim=True)  # [rows, 1]
    initial_sign = torch.sign(error)
    if pow_of_var_regrowing:
        grow_score = grow_score / torch.pow(input_var.to(dtype).reshape(1, -1), pow_of_var_regrowing)
    grow_order = torch.sort(grow_score, dim=1, stable=True).indices
    device = weight.device
    grow_at = torch.zeros(rows, 2, dtype=torch.long, device=device)
    grow_at[:, 1] = cols - 1
    if pattern.is_nm:
        left = prune_score.to(dtype).masked_fill(mask, float("inf"))  # kept and not yet pruned: finite
        offsets = torch.arange(pattern.m, device=device).reshape(1, -1)
    else:
        kept = cols - int(mask[0].sum()) if rows else 0
        if kept == 0:
            return mask, 0
        by_score = torch.sort(prune_score.to(dtype).masked_fill(mask, float("inf")), dim=1, stable=True).indices
        by_score = by_score[:, :kept]
        prune_order = by_score.gather(1, _signed_order(effect.gather(1, by_score)))
        prune_at = torch.zeros(rows, 2, dtype=torch.long, device=device)
        prune_at[:, 1] = kept - 1

    active = torch.ones(rows, 1, dtype=torch.bool, device=device)
    swaps = torch.zeros((), dtype=torch.long, device=device)
    for _ in range(max_cycle_time):
        if not bool(active.any()):
            break
        side = (error > 0).long()  # error > 0: grow the largest positive effect, from the back
        at = grow_at.gather(1, side)
        valid = (at >= 0) & (at < cols)
        grow = grow_order.gather(1, at.clamp(0, cols - 1))
        _pointer_step(grow_at, side)
        if pattern.is_nm:
            start = grow - grow % pattern.m
            group = start + offsets
            lowest = torch.argmin(left.gather(1, group), dim=1, keepdim=True)
            prune = start + lowest
            valid &= torch.isfinite(left.gather(1, prune))
        else:
            side = (error < 0).long()  # error < 0: prune a positive effect, from the back of prune_order
            at = prune_at.gather(1, side)
            valid &= (at >= 0) & (at < kept)
            prune = prune_order.gather(1, at.clamp(0, kept - 1))
            _pointer_step(prune_at, side)
        valid &= mask.gather(1, grow) & ~mask.gather(1, prune)  # a swap of one pruned and one kept weight
        grown, pruned = effect.gather(1, grow), effect.gather(1, prune)
        after = error + pruned - grown
        active &= error.abs() > update_threshold
        if pattern.is_nm or not without_same_sign:
            active &= initial_sign == torch.sign(after)
        active &= valid
        mask.scatter_(1, prune, mask.gather(1, prune) | active)
        mask.scatter_(1, grow, mask.gather(1, grow) & ~active)
        if pattern.is_nm:
            left.scatter_(1, prune, torch.where(active, float("inf"), left.gather(1, prune)))
        error += torch.where(active, pruned, torch.zeros_like(pruned))
        error -= torch.where(active, grown, torch.zeros_like(grown))
        swaps += active.sum()
    return mask, int(swaps)


# ---- the method ----------------------------------------------------------------------------------------------

def dsnot_prune(weight: torch.Tensor, prepared: Prepared | DSnoTInputs, sparsity: float, pattern: Pattern,
                **options) -> PruneResult:
    """Prune one weight [outputs, inputs] with the base's mask refined by DSnoT; kept weights keep their
    values and the new weight keeps its dtype."""
    opts = defaults(DSNOT_OPTIONS) | options
    base = opts["base"]
    if isinstance(prepared, DSnoTInputs):
        prepared = prepare_dsnot(prepared, base, opts["percdamp"])
    if pattern.is_nm:
        pattern.check_width(weight.shape[1])
    score = base_scores(base, weight, prepared)
    mask = nm_mask(score, pattern) if pattern.is_nm else row_mask(score, sparsity)
    info = {}
    if prepared.inverse is not None and prepared.inverse.percdamp != opts["percdamp"]:
        info["percdamp"] = prepared.inverse.percdamp
    if not opts["without_dsnot"]:
        inputs = prepared.inputs
        prune_score = score if pattern.is_nm else (score if base == "wanda" else
                                                   wanda_scores(weight, inputs.act_sq_norm))
        mask, swaps = dsnot_refine(weight, mask, inputs.input_sum, inputs.input_var, prune_score, pattern,
                                   opts["max_cycle_time"], opts["update_threshold"], opts["pow_of_var_regrowing"],
                                   opts["without_same_sign"])
        info["swaps"] = swaps
    return PruneResult(weight.masked_fill(mask, 0), mask, info)


def is_attention(layer: str) -> bool:
    """Whether a layer (its name inside the decoder block, e.g. self_attn.q_proj) belongs to attention."""
    first = layer.split(".")[0].lower()
    return "attn" in first or "attention" in first


def dsnot_per_layer(layer: str, options: dict) -> dict:
    """The options for one layer: a skipped layer (skip_layer, skip_sub_layer) keeps the base mask."""
    opts = defaults(DSNOT_OPTIONS) | options
    skip = opts["skip_layer"]
    skipped = ((skip == "mlp" and not is_attention(layer)) or (skip == "self_attn" and is_attention(layer))
               or layer.split(".")[-1] == opts["skip_sub_layer"])
    return options | {"without_dsnot": True} if skipped else options


def dsnot_configure(method, options: dict):
    """The method for a run's options: the Hessian is gathered only for base sparsegpt."""
    return replace(method, statistic=statistic_for((defaults(DSNOT_OPTIONS) | options)["base"]))
