"""ADMM layer reconstruction (Boza, 2024; Meng et al., ALPS, 2024): choose a sparse support and the
weights on it together, by alternating a ridge solve with the Hessian and a projection onto the pattern.

Problem. For W [rows = outputs, cols = inputs] and H = (2/N) sum X X^T, find W' on the pattern that
minimises tr((W - W') H (W - W')^T) = ||X^T (W - W')^T||^2 (up to 2/N). Rows are independent systems
that share H, so we hold weights transposed, [cols, rows], one column per output row.

Normalisation. Dead inputs (diag H = 0) get H_jj = 1 and their weights 0, as in SparseGPT; then
H += percdamp * mean(diag H) * I. With D = diag(sqrt(diag H)) the problem is solved in the scaled
variables  A = D^-1 H D^-1 (unit diagonal)  and  B = W D  (W' = Z D^-1 at the end), where
|B_ij| = |W_ij| sqrt(H_jj) is Wanda's score, so a projection by magnitude in these variables ranks
weights by their effect on the output, and one penalty rho suits every layer (both reference codes
normalise this way).

ADMM (scaled form, Boza's order), with X free, Z on the pattern and U the scaled dual:
    Z <- P(X + U)                          projection: keep the largest |.| (see below)
    U <- U + X - Z
    X <- (A + rho I)^-1 (A B + rho (Z - U))    one Cholesky factorisation per rho, reused
X starts at B, U at 0. With V = X + U this is  U <- V on the pruned entries (0 elsewhere) and
Z - U = V with the pruned entries negated, which is what the loop computes.

Projection P. N:M: the N smallest |.| of every M consecutive inputs per row are pruned. Unstructured:
one count over the whole matrix, floor(rows * cols * p) entries, as both reference codes do by
default: a matrix-wide budget lets the solver put the zeros where they cost least (SparseGPT's own
rule is not per row either: one threshold per column block).

Mask phase-in (Boza's gradual pruning). During the first T = phase_steps iterations the pruned share
rises as p_t = p (1 - (1 - t/T)^3), t = 1..T, and the mask is recomputed from X + U each time, so a
weight pruned early can come back; after step T the mask is fixed and the remaining iterations only
move the kept weights. For N:M, step t prunes the share p_t/p of the entries that the N:M rule would
prune (the smallest of them first), reaching exact N:M at step T. Intermediate steps use a sampled
threshold (their exact count does not matter); step T selects exactly.

Penalty and schedule. rho is fixed (Boza) unless rho_growth > 1 multiplies it after every
iteration (ALPS raises rho to settle the support; the scaled dual is rescaled when rho changes).
After each ridge solve X is over-relaxed, X <- a X + (1 - a) Z (Boyd et al. 2011, sec. 3.4.3; not in
either reference code), which with a = 1.5 reaches in 12 iterations what plain ADMM needs 20+ for.
Defaults, measured on 21 SmolLM2-135M layers with their real Hessians (error relative to SparseGPT,
mean over 50/70/80% and 2:4; one matrix product per iteration): Boza's 20 iterations, 15 phase-in,
rho 1: 0.762; ours, 12 iterations, 10 phase-in, rho 0.8, a 1.5: 0.751. rho below ~0.5 is much worse
(0.4: 0.84), so the default keeps a margin above it.

Refit. The ADMM output is Z = P(X + U). Optionally (refit_iters > 0) refine the kept weights by
conjugate gradient on A restricted to the support, each output row its own system, batched, as ALPS
does: A has unit diagonal, so this is CG with ALPS's diagonal preconditioner. It is off by default:
after ADMM the support's weights are already near their optimum (10 steps gain ~0.3% error for ~60%
more time). Finally W' = Z D^-1, pruned entries exactly 0, in the weight's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .masks import Pattern, PruneResult, compute_dtype
from .numerics import NumericsError, damped_factor
from .options import Option, check_options, defaults

ADMM_OPTIONS: tuple[Option, ...] = (
    Option("iterations", int, 12, "ADMM iterations: ridge solve, projection, dual update (Boza: 20)",
           minimum=0, maximum=10_000),
    Option("phase_steps", int, 10, "iterations over which sparsity rises (cubic) to the target; the mask "
           "is fixed after them (Boza: 15; 0 = the full mask from the start)", minimum=0, maximum=10_000),
    Option("rho", float, 0.8, "ADMM penalty in the normalised problem (unit-diagonal Hessian; Boza: 1)",
           above=0.0),
    Option("rho_growth", float, 1.0, "multiply rho by this after every iteration (1 = fixed, as Boza; "
           "each new rho costs one factorisation)", minimum=1.0, maximum=10.0),
    Option("relaxation", float, 1.5, "over-relaxation a: X <- a X + (1 - a) Z after each ridge solve "
           "(1 = plain ADMM, as Boza)", minimum=0.5, maximum=1.95),
    Option("percdamp", float, 0.01, "Hessian damping: H += percdamp * mean(diag H) * I (as SparseGPT)",
           minimum=0.0, maximum=10.0),
    Option("refit_iters", int, 0, "conjugate-gradient steps refitting the kept weights on the final "
           "support, as ALPS does (0 = off)", minimum=0, maximum=10_000),
)


@dataclass(frozen=True)
class AdmmHessian:
    """The normalised Hessian, computed once per distinct layer input (q/k/v share one).

    `factors` caches, per rho, (A + rho I)^-1: layers sharing this input reuse it.
    """

    normalized: torch.Tensor  # A = D^-1 (H + damp I) D^-1, unit diagonal, compute dtype
    scale: torch.Tensor  # sqrt(diag(H + damp I)): B = W * scale
    dead: torch.Tensor  # bool [cols]: inputs with diag(H) == 0
    percdamp: float  # the damping fraction actually used
    factors: dict = field(default_factory=dict, compare=False, repr=False)

    def inverse(self, rho: float) -> torch.Tensor:
        if rho not in self.factors:
            eye = torch.eye(len(self.scale), dtype=self.normalized.dtype, device=self.normalized.device)
            lower, info = torch.linalg.cholesky_ex(self.normalized + rho * eye)
            if info.item() != 0:
                raise NumericsError(f"Cholesky of the normalised Hessian + rho*I failed (rho={rho:g})")
            self.factors[rho] = torch.cholesky_inverse(lower)
        return self.factors[rho]


def prepare_admm(hessian: torch.Tensor, percdamp: float = 0.01, max_percdamp: float = 10.0,
                 **_options) -> AdmmHessian:
    """Dead inputs get H[j, j] = 1; H += damp * I with damp = percdamp * mean(diag H); normalise to unit
    diagonal. If the damped H is not positive-definite, retry with 10x the damping up to max_percdamp,
    and warn (as SparseGPT's prepare_hessian does)."""
    factorable = lambda damped: damped if torch.linalg.cholesky_ex(damped).info.item() == 0 else None  # noqa: E731
    _same, damped, dead, damp_frac = damped_factor(hessian, percdamp, max_percdamp, factorable)
    scale = torch.sqrt(torch.diag(damped))
    normalized = damped / scale[:, None] / scale[None, :]
    normalized.diagonal().fill_(1)  # exactly 1, not 1 +- rounding
    return AdmmHessian(normalized, scale, dead, damp_frac)


def admm_prune(weight: torch.Tensor, hessian: torch.Tensor | AdmmHessian, sparsity: float, pattern: Pattern,
               **options) -> PruneResult:
    """Prune and reconstruct one weight [outputs, inputs] with ADMM; the new weight keeps its dtype.

    options: see ADMM_OPTIONS (iterations, phase_steps, rho, rho_growth, relaxation, percdamp,
    refit_iters). With a prepared AdmmHessian its damping is used; info["percdamp"] reports it when it
    differs from the option's.
    """
    opts = defaults(ADMM_OPTIONS) | check_options("admm", ADMM_OPTIONS, options)
    prepared = hessian if isinstance(hessian, AdmmHessian) else prepare_admm(hessian, opts["percdamp"])
    A = prepared.normalized
    compute = compute_dtype(weight.dtype, A.dtype)
    rows, cols = weight.shape
    if A.shape != (cols, cols):
        raise ValueError(f"Hessian is {tuple(A.shape)} but the weight has {cols} inputs")
    pattern.check_width(cols)
    A = A.to(compute)
    scale = prepared.scale.to(compute)
    dead = prepared.dead

    select = _Selector(rows, cols, sparsity, pattern, dead)
    if select.total == 0:  # nothing to prune: the weights as they are, less the dead inputs'
        mask = torch.zeros_like(weight, dtype=torch.bool)
        new_weight = weight.detach().masked_fill(dead[None, :], 0)
    else:
        B = weight.detach().to(compute).t() * scale[:, None]  # [cols, rows], normalised
        B[dead] = 0
        B = B.contiguous()
        Z, mask_t = _admm(A, B, select, prepared, compute, opts)
        if opts["refit_iters"]:
            Z = _refit(A, B, Z, mask_t, opts["refit_iters"])
        Z = Z.masked_fill_(mask_t, 0)
        new_weight = (Z / scale[:, None]).t().to(weight.dtype)
        mask = mask_t.t()

    info = {}
    if prepared.percdamp != opts["percdamp"]:
        info["percdamp"] = prepared.percdamp
    if dead.any():
        info["dead_inputs"] = int(dead.sum())
    return PruneResult(new_weight, mask, info)


def _admm(A, B, select: "_Selector", prepared: AdmmHessian, compute, opts) -> tuple[torch.Tensor, torch.Tensor]:
    """The ADMM loop in the normalised, transposed variables; returns (Z, pruned mask), both [cols, rows]."""
    iterations, rho, relaxation = opts["iterations"], opts["rho"], opts["relaxation"]
    phase = min(opts["phase_steps"], iterations)
    X = B.clone()
    U = torch.zeros_like(B)
    V = torch.empty_like(B)
    T = torch.empty_like(B)
    Z = torch.empty_like(B) if relaxation != 1 else None
    mask = select.exact(B) if phase == 0 else None
    for t in range(iterations):
        torch.add(X, U, out=V)
        if t < phase:
            share = 1 - (1 - (t + 1) / phase) ** 3
            mask = select.exact(V) if t == phase - 1 else select.approximate(V, share)
        torch.mul(V, mask, out=U)  # the pruned part of V is the new dual
        torch.add(V, U, alpha=-2, out=T).sub_(B)  # (Z - U) - B, with Z - U = V with its pruned entries negated
        # (A + rho I)^-1 (A B + rho (Z - U)) = B + rho (A + rho I)^-1 ((Z - U) - B): one product per iteration.
        torch.addmm(B, prepared.inverse(rho).to(compute), T, alpha=rho, out=X)
        if Z is not None:  # over-relaxation: X <- a X + (1 - a) Z
            torch.sub(V, U, out=Z)
            X.mul_(relaxation).add_(Z, alpha=1 - relaxation)
        if opts["rho_growth"] != 1:
            U.mul_(1 / opts["rho_growth"])  # the scaled dual is U = dual / rho
            rho = rho * opts["rho_growth"]
    if iterations == 0:
        return B.masked_fill(mask, 0), mask
    torch.add(X, U, out=V)
    return V.masked_fill_(mask, 0), mask


def _refit(A, B, Z, mask, steps: int) -> torch.Tensor:
    """Conjugate gradient on min_Z tr((Z - B)^T A (Z - B)) with Z = 0 on the mask, one system per column
    (output row), started from Z. A has unit diagonal: the diagonal preconditioner is already applied.
    A column stops once its residual is 100 machine epsilons of where it started: past that, rounding
    would only make it wander."""
    keep = ~mask
    Z = Z.clone()
    R = (A @ (B - Z)).mul_(keep)
    P = R.clone()
    rs = (R * R).sum(0)
    floor = rs * (100 * torch.finfo(R.dtype).eps) ** 2
    zero = torch.zeros_like(rs)
    for _ in range(steps):
        active = rs > floor
        AP = (A @ P).mul_(keep)
        curvature = (P * AP).sum(0)
        alpha = torch.where(active & (curvature > 0), rs / curvature, zero)
        Z.addcmul_(P, alpha)
        R.addcmul_(AP, alpha, value=-1)
        rs_next = (R * R).sum(0)
        beta = torch.where(active, rs_next / rs, zero)
        P.mul_(beta).add_(R)
        rs = torch.where(active, rs_next, rs)
    return Z


class _Selector:
    """Which entries of V [cols, rows] to prune: exactly (the final mask) or by a sampled threshold
    (phase-in steps, where only the share matters)."""

    SAMPLE = 65536

    def __init__(self, rows: int, cols: int, sparsity: float, pattern: Pattern, dead: torch.Tensor):
        self.rows, self.cols, self.pattern, self.dead = rows, cols, pattern, dead
        self.any_dead = bool(dead.any())
        numel = rows * cols
        self.total = numel // pattern.m * pattern.n if pattern.is_nm else int(numel * sparsity)
        # A strided sample that visits every row: the stride must share no factor with the row count.
        stride = max(1, numel // self.SAMPLE)
        while math.gcd(stride, rows) != 1:
            stride += 1
        self.stride = stride

    def _scores(self, V: torch.Tensor) -> torch.Tensor:
        scores = V.abs()
        if self.any_dead:
            scores[self.dead] = -1  # dead inputs are pruned first
        return scores

    def _nm_candidates(self, scores: torch.Tensor) -> torch.Tensor:
        """bool [cols, rows]: the N smallest of every M consecutive inputs in each row, ties to the
        lower input. In this layout a group's members are M whole rows of `scores`, so ranking them by
        pairwise comparison is M(M-1) passes over contiguous vectors (4x faster than topk on CPU)."""
        m, n = self.pattern.m, self.pattern.n
        groups = scores.view(self.cols // m, m, self.rows)
        candidates = torch.empty(groups.shape, dtype=torch.bool, device=scores.device)
        for j in range(m):
            rank = torch.zeros_like(groups[:, j], dtype=torch.uint8)
            for k in range(m):
                if k != j:  # an equal score earlier in the group ranks lower
                    rank += (groups[:, k] <= groups[:, j]) if k < j else (groups[:, k] < groups[:, j])
            torch.lt(rank, n, out=candidates[:, j])
        return candidates.view(self.cols, self.rows)

    def exact(self, V: torch.Tensor) -> torch.Tensor:
        scores = self._scores(V)
        if self.pattern.is_nm:
            return self._nm_candidates(scores)
        return _lowest(scores, self.total)

    def approximate(self, V: torch.Tensor, share: float) -> torch.Tensor:
        scores = self._scores(V)
        candidates = None
        if self.pattern.is_nm:
            candidates = self._nm_candidates(scores)
            scores.masked_fill_(~candidates, math.inf)
        count = int(self.total * share)
        if count == 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        sample = scores.view(-1)[:: self.stride]
        rank = min(len(sample), max(1, round(count * len(sample) / scores.numel())))
        threshold = torch.kthvalue(sample, rank).values
        mask = scores <= threshold
        return mask if candidates is None else mask.logical_and_(candidates)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool mask of exactly `count` lowest scores; ties at the threshold go to the lower flat index."""
    flat = scores.reshape(-1)
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, count).values
    mask = flat <= threshold
    if int(mask.sum()) > count:  # ties at the threshold: keep the later ones
        ties = flat == threshold
        mask = (flat < threshold) | (ties & (torch.cumsum(ties, 0) <= count - (flat < threshold).sum()))
    return mask.reshape(scores.shape)
