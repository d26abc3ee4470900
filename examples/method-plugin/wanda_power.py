"""Wanda with a power on the activation norm: score = |W| * ||X_j||^a, the smallest per output row pruned.
a = 1 is Wanda; a = 0 is row-wise magnitude. A complete oneshot method: one pure function of tensors,
its option declared beside it, the statistic it needs named, and one Method for the registry."""
from oneshot.methods import Method, Option, PruneResult
from oneshot.methods.masks import nm_mask, row_mask  # N lowest of every M; the lowest fraction of each row
from oneshot.methods.statistics import ActSqNorm  # s_j: the squared L2 norm of input feature j, averaged


def wanda_power_prune(weight, act_sq_norm, sparsity, pattern, a=1.0):
    """weight [outputs, inputs]; returns the pruned weight and its mask (True where pruned)."""
    score = weight.abs().float() * act_sq_norm.float().sqrt().pow(a)[None, :]
    mask = nm_mask(score, pattern) if pattern.is_nm else row_mask(score, sparsity)
    return PruneResult(weight.masked_fill(mask, 0), mask, {})


METHOD = Method(
    "wanda-power", ActSqNorm, wanda_power_prune,
    "drop the smallest |W| * ||X||_2^a within each output row (a = 1: Wanda)",
    options=(Option("a", float, 1.0, "the power on the activation norm", minimum=0.0, maximum=4.0),),
)
