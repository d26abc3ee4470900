"""Importance scores of whole units, as functions of tensors: weights (and statistics) in, one score per
unit out; lower means less important. Which rows and columns make a unit comes from the structure
map (a Member's `indices`: [units, width]); nothing here knows a model family.

Units inside a block (KV groups with their query heads, MLP channels):
- magnitude: Magnitude-sp (An et al., 2024, the FLAP paper's baseline): the L2 norms of the consuming
  projection's input columns (o_proj, down_proj), summed over the unit's columns.
- wanda: Wanda-sp (same paper): mean over output rows of |W_ij| * ||X_j||_2 at the consuming
  projection, summed over the unit's columns.
- flap: FLAP's fluctuation metric (An et al., 2024, "WIFV"): f_j = Var_tokens(X_j) * ||W_:,j||_2^2 at the
  consuming projection; a unit scores sum of f_j^2 over its columns (the authors' code squares the
  channel scores of a head before adding them; for one channel the order is that of f_j).
- taylor: LLM-Pruner's element-wise first-order term (Ma et al., 2023, "param_first"): sum of
  |w * dL/dw| over every weight the unit owns, in every coupled layer.
- gradient: the sensitivity of the calibration loss to a gate on the unit's output (Michel et al., 2019):
  mean over sequences of |dL_s/dm_u| = |sum over tokens and the unit's columns of x * dL_s/dx| at the
  consuming projection's input.

Whole blocks: magnitude (sum |W|) and taylor (sum |w * dL/dw|) over the block's linear layers (Kim et al.,
2024, Shortened LLaMA); gradient: the same gate on the block's residual branch (output - input);
block influence (ShortGPT, Men et al., 2024): 1 - mean cosine similarity of a block's input and
output over all tokens; angular distance (Gromov et al., 2024): arccos(cos)/pi between the last
token's hidden state before block l and before block l + n, averaged over sequences.

Routed experts (one score per expert of an MoE block): frequency, how many calibration tokens the
router sends to the expert (among its top-k); REAP (CerebrasResearch/reap), the mean over the tokens
routed to the expert of its gate weight times the L2 norm of its output; router-logit, the mean over
all calibration tokens of the router's softmax probability for the expert.
"""
from __future__ import annotations

import math

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_unit(channel_scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sum per unit of per-column scores; `index` [units, width] lists each unit's columns."""
    return channel_scores[index.to(channel_scores.device)].sum(dim=1)


def magnitude_sp(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """weight: the consuming projection [outputs, inputs]."""
    return per_unit(at_least_fp32(weight).norm(dim=0), index)


def wanda_sp(weight: torch.Tensor, sq_norm: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """sq_norm[j]: the squared L2 norm of input j over the calibration tokens (any constant scale)."""
    weight = at_least_fp32(weight)
    return per_unit((weight.abs() * sq_norm.to(weight).sqrt()[None, :]).mean(dim=0), index)


def flap(weight: torch.Tensor, variance: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """variance[j]: the sample variance of input j over the calibration tokens."""
    weight = at_least_fp32(weight)
    fluctuation = variance.to(weight) * weight.pow(2).sum(dim=0)
    return per_unit(fluctuation.pow(2), index)


def taylor(members) -> torch.Tensor:
    """members: (weight [outputs, inputs], its gradient, axis, index [units, width]) for every layer
    the unit spans; axis 0 means the unit owns rows, 1 columns."""
    total = None
    for weight, grad, axis, index in members:
        # one value per row (axis 0) or column (axis 1)
        saliency = (at_least_fp32(weight) * at_least_fp32(grad)).abs().sum(dim=1 - axis)
        scores = per_unit(saliency, index)
        total = scores if total is None else total + scores
    return total


def gate_gradients(activation: torch.Tensor, grad: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per sequence and unit, dL/dm_u for a gate m_u on the unit's columns of `activation`
    [sequences, tokens, features]: sum over tokens and columns of x * dL/dx. Returns [sequences, units]."""
    per_column = (at_least_fp32(activation) * at_least_fp32(grad)).sum(dim=1)  # [sequences, features]
    return per_column[:, index.to(per_column.device)].sum(dim=2)


def block_magnitude(weights) -> float:
    """Sum of |W| over a block's linear weights."""
    return sum(float(at_least_fp32(w).abs().sum()) for w in weights)


def block_taylor(pairs) -> float:
    """Sum of |w * dL/dw| over a block's linear weights; pairs of (weight, gradient)."""
    return sum(float((at_least_fp32(w) * at_least_fp32(g)).abs().sum()) for w, g in pairs)


def branch_gate_gradients(branch: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per sequence, dL/dm for a gate m on a block's residual branch (output - input), from the branch
    [sequences, ...] and the loss gradient at the block's output: sum of branch * grad. Returns [sequences]."""
    return (at_least_fp32(branch) * at_least_fp32(grad)).reshape(branch.shape[0], -1).sum(dim=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis, in at least fp32 (zero vectors give 0)."""
    a, b = at_least_fp32(a), at_least_fp32(b)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi per row, in [0, 1]."""
    return torch.arccos(cosine(a, b).clamp(-1.0, 1.0)) / math.pi


def angular_window(states: list[torch.Tensor], count: int) -> int:
    """Gromov et al.: the first of `count` consecutive blocks to remove, l* = argmin_l d(x_l, x_{l+count}),
    where states[l] [sequences, hidden] is the last token's input to block l (states[-1]: the output of
    the last block) and d is the mean angular distance over sequences. Ties go to the earlier l."""
    distances = [float(angular_distance(states[start], states[start + count]).mean())
                 for start in range(len(states) - count)]
    return min(range(len(distances)), key=lambda start: (distances[start], start))


def reap(weighted_norms: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """REAP saliency per routed expert (CerebrasResearch/reap, `update_pruning_state`): the mean over the
    tokens routed to the expert of its gate weight times the L2 norm of its output. weighted_norms[e]:
    that product summed over expert e's tokens; counts[e]: how many. An expert no token reached scores 0."""
    counts = counts.to(weighted_norms.device)
    return torch.where(counts > 0, weighted_norms / counts.clamp(min=1).to(weighted_norms.dtype),
                       torch.zeros_like(weighted_norms))


def lowest_in_groups(scores: torch.Tensor, count: int, groups: list[list[int]]) -> list[int]:
    """The `count` lowest-scored experts, the same number from every routing group (ties go to the lower
    index), ascending."""
    per_group = count // len(groups)
    return sorted(group[i] for group in groups for i in lowest(scores[group], per_group))


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """The `count` lowest-scored units, ascending by index (ties go to the lower index)."""
    if count <= 0:
        return []
    order = torch.sort(scores.detach().cpu().to(torch.float64), stable=True).indices
    return sorted(order[:count].tolist())
