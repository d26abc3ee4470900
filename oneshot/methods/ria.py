"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play").

Score of weight W_ij (rows i = outputs, columns j = inputs):

    S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * (||X_j||_2)^a,   a = 0.5 by default,

where ||X_j||_2 = sqrt(s_j) and s_j = `act_sq_norm[j]` is Wanda's statistic (the squared L2 norm of input
feature j over a sequence's tokens, averaged over sequences: the authors' `scaler_row`). The square root is
taken first and the power a after it, as in the authors' code. A zero row or column (0/0) scores 0.

What is pruned, as in the authors' default path (`--prune_method ria`; biomedical-cybernetics/
Relative-importance-and-activation-pruning, lib/prune.py, prune_ria):

- unstructured: one threshold per weight matrix, prune S <= the value at rank floor(numel * p) (their
  default; `per_outneuron=true` prunes the floor(cols * p) lowest of each output row instead, their
  --per_outneuron);
- N:M: the N lowest scores of every M consecutive inputs, per row. By default directly, without a channel
  permutation (their default). `reallocation=true` (their --reallocation) first permutes the input channels
  so that the N:M selection may keep more total score (a heuristic, without a guarantee): columns ranked by `importance_score` (their default
  "sum": the column sums of S) are dealt out slot by slot, the first cols/M to slot 0 of each group in
  ascending order, the next cols/M to slot 1 in descending order, and so on alternating. `lsa=true` (their
  --lsa, which acts only after the reallocation) then improves the permutation slot by slot: for slot c,
  the channels in slot c are reassigned among the groups by a linear sum assignment that maximises the total
  kept score (scipy's linear_sum_assignment, as theirs); `lsa_blocks` > 1 solves it within that many
  contiguous blocks of groups (their --fast uses 4, 8 or 16 blocks by layer name).
  The permutation only chooses the mask: the mask found on the permuted columns is put back in the original
  column order, so the pruned weight keeps its layout and the layer computes the same function of its
  unpruned weights (as the authors do outside their --semi_sparse_acc kernels). The N:M pattern then holds
  in the permuted column order (W[:, index]), not in the stored one: a 2:4 kernel would need the inputs
  permuted the same way. Each such layer's notes name the permutation and the kept-score gain over direct
  N:M.

The score and selection are computed in fp32 (fp64 for an fp64 model); the assignment sees fp32 totals,
as in the authors' code. The authors' optional SparseGPT reconstruction of the kept weights
(--reconstruction) needs the Hessian and is not part of this method.
"""
from __future__ import annotations

import torch

from .masks import (
    Pattern,
    PatternError,
    PruneResult,
    compute_dtype,
    nm_mask,
    row_mask,
    threshold_mask,
)
from .options import Option, OptionError

IMPORTANCE_SCORES = ("sum", "retained_degree_unstructured", "retained_degree_per_outneuron")

RIA_OPTIONS = (
    Option("a", float, 0.5, "the power on the activation norm ||X_j||_2 (0: relative importance alone)",
           minimum=0.0, maximum=4.0),
    Option("per_outneuron", bool, False,
           "unstructured: prune the lowest fraction of each output row instead of one threshold per matrix"),
    Option("reallocation", bool, False,
           "N:M: permute the input channels (heuristic channel reallocation) before choosing the N:M mask"),
    Option("importance_score", str, "sum", "N:M with reallocation: how the input channels are ranked",
           choices=IMPORTANCE_SCORES),
    Option("lsa", bool, False,
           "N:M with reallocation: refine the permutation by a linear sum assignment per slot"),
    Option("lsa_blocks", int, 1, "N:M with lsa: solve each assignment within this many blocks of groups",
           minimum=1, maximum=64),
)


def _relative(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """|W| divided by its sum along `dim`; 0 where that sum is 0 (all those weights are 0)."""
    total = weight.sum(dim=dim, keepdim=True)
    return torch.where(total > 0, weight / total, torch.zeros((), dtype=weight.dtype))


def ria_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """S = (|W| / column sums of |W| + |W| / row sums of |W|) * sqrt(s)^a, in the compute dtype."""
    dtype = compute_dtype(weight.dtype, act_sq_norm.dtype)
    w = weight.abs().to(dtype)
    return (_relative(w, 0) + _relative(w, 1)) * (torch.sqrt(act_sq_norm.to(dtype)) ** a).reshape(1, -1)


def kept_score(scores: torch.Tensor, mask: torch.Tensor) -> float:
    """The total score of the weights a mask keeps (what the channel permutation raises)."""
    return float(scores.masked_fill(mask, 0).sum())


def _stable_lexsort(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices sorting ascending by `primary`, ties by `secondary`, then by index."""
    order = torch.sort(secondary, stable=True).indices
    return order[torch.sort(primary[order], stable=True).indices]


def channel_order(scores: torch.Tensor, sparsity: float, importance_score: str = "sum") -> torch.Tensor:
    """The input channels ranked from least to most important, by `importance_score`."""
    if importance_score == "sum":
        return torch.sort(scores.sum(dim=0), stable=True).indices
    if importance_score == "retained_degree_unstructured":
        pruned = threshold_mask(scores, sparsity)
    else:
        pruned = row_mask(scores, sparsity)
    return _stable_lexsort(scores.masked_fill(pruned, 0).sum(dim=0), pruned.sum(dim=0))


def reallocate(order: torch.Tensor, m: int) -> torch.Tensor:
    """The heuristic channel reallocation: position g*m + c of the permuted layer reads input channel
    index[g*m + c]. Slot c of the groups takes the c-th of m equal parts of `order`, in reverse for odd c."""
    part = order.numel() // m
    index = torch.empty_like(order)
    for slot in range(m):
        chunk = order[slot * part:(slot + 1) * part]
        index[slot::m] = chunk.flip(0) if slot % 2 else chunk
    return index


def _slot_gains(scores: torch.Tensor, slot: int, n: int, m: int) -> torch.Tensor:
    """gains[r, t]: the score group r keeps (summed over rows) if the channel in its slot `slot` is
    replaced by the one in slot `slot` of group t. `scores` is [rows, groups*m], already permuted.

    With the other m-1 values of group r sorted, o_1 <= ... <= o_{m-1}, and x the incoming value, the kept
    m-n largest sum to o_n + ... + o_{m-1} + max(x - o_n, 0)."""
    rows, cols = scores.shape
    groups = cols // m
    grouped = scores.reshape(rows, groups, m)
    others = torch.cat([grouped[:, :, :slot], grouped[:, :, slot + 1:]], dim=2).sort(dim=2).values
    base = others[:, :, n - 1:].sum(dim=(0, 2))  # [groups]: what group r keeps from its other channels
    threshold = others[:, :, n - 1]  # [rows, groups]: o_n of group r
    incoming = grouped[:, :, slot]  # [rows, groups]: x of candidate t
    gains = torch.empty(groups, groups, dtype=scores.dtype, device=scores.device)
    step = max(1, (1 << 24) // max(1, rows * groups))
    for start in range(0, groups, step):
        stop = min(groups, start + step)
        over = incoming[:, None, :] - threshold[:, start:stop, None]  # [rows, r, t]
        gains[start:stop] = over.clamp_min_(0).sum(dim=0)
    return gains + base[:, None]


def assignment_refine(scores: torch.Tensor, index: torch.Tensor, pattern: Pattern, blocks: int = 1) -> torch.Tensor:
    """Improve the permutation `index` by a linear sum assignment for each slot in turn: the channels in
    slot c move between groups (within each of `blocks` contiguous blocks of groups) so that the kept
    N:M score is as large as possible with the other slots fixed."""
    from scipy.optimize import linear_sum_assignment

    cols = scores.shape[1]
    groups = cols // pattern.m
    if groups % blocks:
        raise PatternError(f"method ria option lsa_blocks={blocks} must divide the {groups} groups of "
                           f"{pattern.m} inputs of a {cols}-input layer; choose a divisor of {groups}")
    width = cols // blocks
    index = index.clone()
    for slot in range(pattern.m):
        for block in range(blocks):
            part = index[block * width:(block + 1) * width]
            gains = _slot_gains(scores[:, part], slot, pattern.n, pattern.m)
            _, chosen = linear_sum_assignment(gains.to(torch.float32).cpu().numpy(), maximize=True)
            local = torch.arange(width, device=index.device)
            places = torch.arange(groups // blocks, device=index.device) * pattern.m + slot
            local[places] = torch.as_tensor(chosen, device=index.device) * pattern.m + slot
            index[block * width:(block + 1) * width] = part[local]
    return index


def permuted_nm_mask(scores: torch.Tensor, index: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The N:M mask chosen on the columns in the order `index`, returned in the original column order."""
    mask = torch.empty_like(scores, dtype=torch.bool)
    mask[:, index] = nm_mask(scores[:, index], pattern)
    return mask


def ria_mask(weight: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float, pattern: Pattern, a: float = 0.5,
             per_outneuron: bool = False, reallocation: bool = False, importance_score: str = "sum",
             lsa: bool = False, lsa_blocks: int = 1) -> tuple[torch.Tensor, dict]:
    """The mask (True where pruned) in the weight's column order, and notes: with a channel permutation,
    which one and how much more score it keeps than direct N:M."""
    if lsa and not reallocation:
        raise OptionError("method ria option lsa=true refines the channel reallocation; give reallocation=true too")
    scores = ria_scores(weight, act_sq_norm, a)
    if not pattern.is_nm:
        return (row_mask(scores, sparsity) if per_outneuron else threshold_mask(scores, sparsity)), {}
    pattern.check_width(scores.shape[1])
    direct = nm_mask(scores, pattern)
    if not reallocation:
        return direct, {}
    index = reallocate(channel_order(scores, sparsity, importance_score), pattern.m)
    if lsa:
        index = assignment_refine(scores, index, pattern, lsa_blocks)
    mask = permuted_nm_mask(scores, index, pattern)
    before = kept_score(scores, direct)
    gain = kept_score(scores, mask) / before - 1 if before > 0 else 0.0
    return mask, {"channel_permutation": "reallocation+lsa" if lsa else "reallocation", "kept_score_gain": round(gain, 6)}


def ria_prune(weight: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float, pattern: Pattern, **options):
    """Prune one weight [outputs, inputs] by RIA's score; the new weight keeps its dtype and layout.
    Options: RIA_OPTIONS (a, per_outneuron, reallocation, importance_score, lsa, lsa_blocks)."""
    mask, notes = ria_mask(weight, act_sq_norm, sparsity, pattern, **options)
    return PruneResult(weight.masked_fill(mask, 0), mask, notes)
