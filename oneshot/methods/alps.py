"""ALPS (Meng, Behdin, Wang & Mazumder, NeurIPS 2024, "ALPS: Improved Optimization for Highly Sparse
One-Shot Pruning for Large Language Models"), as the authors' code computes it (mazumder-lab/ALPS,
`alps.py`: `ALPS_prune.ALPS_admm` and `cg_batch`; read, not copied).

Problem. For W [rows = outputs, cols = inputs] and H = (2/N) sum X X^T, find W' on the pattern that
minimises tr((W - W') H (W - W')^T). Rows are independent systems sharing H, so the weights are held
transposed, [cols, rows], one column per output row, as the authors do.

Normalisation (authors'). H += percdamp * mean(diag H) * I over the whole diagonal (no special case for
dead inputs: a zero H_jj becomes the damping); s = sqrt(diag H) + 1e-8; A = H / (s s^T); B0 = (W s)^T;
the right-hand side is A B0 (their YtX^T). A is eigendecomposed once in float64 (A = Q diag(L) Q^T) and
every (A + rho I)^-1 is formed from it in float64, then rounded to the compute dtype.

ADMM (authors' order and variables: x-iterate B, projected D, unscaled dual V), from D = P(B0), V = 0:
    B <- (A + rho I)^-1 (A B0 - V + rho D)
    D <- P((V + rho B) / rho)
    V <- V + rho (B - D)
P keeps the largest D^2: unstructured, one count over the matrix, round((1 - p) rows cols) kept; N:M,
per output row the N smallest of every M consecutive inputs pruned (the authors' nm_n counts the KEPT
entries of a group: their nm_n = M - N, nm_m = M).

Penalty schedule and stopping (authors'). Every update_iter (3) iterations the support of D is compared
with the support at the previous check; with c = the number of entries that changed and k = the number
kept: c/k > 0.1: rho *= 1.3; c/k > 0.005: rho *= 1.2; otherwise, if c >= 1: rho *= 1.1 once rho has
been raised before, else rho /= 5 and the iterates restart (B = B0, D = P(B0), V = 0); if c = 0: stop
once rho has been raised before, else rho /= 5. rho is capped at 1e6 and (A + rho I)^-1 re-formed; from
iteration switch_iter (30) on, c/k < 0.0003 stops the loop; max_iter (300) iterations at most. The
support is then fixed as P(B) of the last x-iterate.

Refit (authors'). Conjugate gradient on A Z = A B0 restricted to the support (the pruned entries stay
0), each output row its own system, batched, from Z = P(B): at most cg_iters (10) steps, a zero
denominator replaced by 1e-8, and an early stop when, for every input j, the norm over outputs of the
full residual (A Z - A B0)_j is within cg_rtol (1e-4) of that of (A B0)_j. A has unit diagonal (to 1e-8), so the
authors' "preconditioned" CG (identity preconditioner in these variables) is Jacobi-preconditioned CG
on H. W' = (Z / s)^T, pruned entries exactly 0, in the weight's dtype.

Ours, not the authors':
- the compute dtype: fp32 for fp16/bf16/fp32 weights (theirs: fp32 always), fp64 for an fp64 weight or
  Hessian (numerical studies); the eigendecomposition and inverses are fp64 in both;
- everything runs on the Hessian's device (theirs: the Hessian and eigh on CPU, the loop on cuda:0);
- H is our average (2/N) sum X X^T, theirs the raw sum: the method is scale-invariant except for the
  1e-8 added to s (a relative effect below 1e-8 at realistic scales);
- the support is the projection's own mask (theirs tests D == 0, which differs only if a kept value is
  exactly 0); ties at the threshold go to the lower index (theirs: torch.topk's order);
- the CG's stopping residual A Z - A B0 is updated by recurrence (one product per step, theirs two);
- the residuals of the objective that their loop computes for printing only are not computed;
- guards: a non-finite H raises NumericsError; if the damped, normalised H is not positive-definite
  (min eigenvalue <= 0, so some (A + rho I) could be singular as rho falls), the damping is raised 10x
  (from 0: to 0.01) up to 10, with a warning, as our SparseGPT and ADMM do; sparsity 0 returns the
  weight unchanged (theirs would run the loop and return a refit close to it), and a layer left with no
  weight is all zeros (their support test would divide by zero); a layer whose inputs are all zero gets
  H = I (theirs runs on with A = 0).

It differs from our `admm` (Boza's scaled ADMM with a phased-in mask, a fixed rho and over-relaxation)
in the update order, the unscaled dual, the adaptive rho with restarts, the support-based stopping, the
eigendecomposition and the CG refit on by default; the normalisation is the same but for dead inputs
(ours zeroes them, as SparseGPT does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .admm import _lowest, _Selector
from .masks import Pattern, PruneResult, compute_dtype
from .numerics import check_finite, escalating_damping
from .options import Option, check_options, defaults

ALPS_OPTIONS: tuple[Option, ...] = (
    Option("rho", float, 0.1, "initial ADMM penalty in the normalised problem (the authors' llama.py and "
           "opt.py pass 0.1)", above=0.0),
    Option("max_iter", int, 300, "ADMM iterations at most", minimum=0, maximum=100_000),
    Option("update_iter", int, 3, "every this many iterations the support is compared with the last check, "
           "rho adapted and convergence tested", minimum=1, maximum=10_000),
    Option("switch_iter", int, 30, "iteration from which a support changing by under 0.03% of the kept "
           "entries stops the loop", minimum=0, maximum=100_000),
    Option("percdamp", float, 0.01, "Hessian damping: H += percdamp * mean(diag H) * I", minimum=0.0,
           maximum=10.0),
    Option("cg_iters", int, 10, "conjugate-gradient steps refitting the kept weights on the final support "
           "(0 = no refit)", minimum=0, maximum=100_000),
    Option("cg_rtol", float, 1e-4, "CG stops early when every input's residual norm is within cg_rtol of "
           "its right-hand side's", above=0.0, maximum=1.0),
)

# The authors' schedule: (share of the kept entries whose support changed, factor on rho), checked in order.
RHO_RAISE = ((0.1, 1.3), (0.005, 1.2))
RHO_SLOW = 1.1  # a few support changes after rho has been raised
RHO_RESTART = 5.0  # divides rho when the support barely moves before rho was ever raised
RHO_MAX = 1e6
STABLE_SHARE = 3e-4  # from switch_iter on, a support changing less than this stops the loop
NORM_EPS = 1e-8  # added to sqrt(diag H)
CG_ZERO = 1e-8  # replaces a zero CG denominator
MAX_PERCDAMP = 10.0  # our guard: damping escalates up to this fraction


@dataclass(frozen=True)
class AlpsHessian:
    """The normalised Hessian and its eigendecomposition, computed once per distinct layer input."""

    normalized: torch.Tensor  # A = (H + damp I) / (s s^T), compute dtype
    scale: torch.Tensor  # s = sqrt(diag(H + damp I)) + 1e-8: B0 = (W s)^T
    eigenvalues: torch.Tensor  # L, float64
    eigenvectors: torch.Tensor  # Q, float64: A = Q diag(L) Q^T
    percdamp: float  # the damping fraction actually used

    def inverse(self, rho: float, dtype: torch.dtype) -> torch.Tensor:
        """(A + rho I)^-1 = Q diag(1 / (L + rho)) Q^T, formed in float64 and rounded to `dtype`."""
        Q = self.eigenvectors
        return (Q @ ((1 / (self.eigenvalues + rho)) * Q).T).to(dtype)


def prepare_alps(hessian: torch.Tensor, percdamp: float = 0.01, **_options) -> AlpsHessian:
    """Damp, normalise and eigendecompose H (the authors' steps); raise the damping 10x, with a warning,
    while the result is not positive-definite (our guard)."""
    check_finite(hessian)
    H = hessian.detach().to(compute_dtype(hessian.dtype))
    mean_diag = torch.mean(torch.diag(H)).item()
    if mean_diag == 0:  # every input is zero: any pruned weight is optimal; H = I keeps the kept ones as they are
        H, mean_diag = torch.eye(H.shape[0], dtype=H.dtype, device=H.device), 1.0

    def attempt(damp_frac):
        damped = H.clone()
        damped.diagonal().add_(damp_frac * mean_diag)
        scale = torch.diag(damped).sqrt() + NORM_EPS
        A = damped / scale
        A = (A.T / scale).T
        try:
            L, Q = torch.linalg.eigh(A.double())
        except RuntimeError:  # eigh did not converge
            return None
        return (A, scale, L, Q) if bool(torch.isfinite(L).all()) and float(L.min()) > 0 else None

    (A, scale, L, Q), damp_frac = escalating_damping(percdamp, MAX_PERCDAMP, attempt)
    return AlpsHessian(A, scale, L, Q, damp_frac)


class _Projection:
    """P: keep the largest D^2 (pruned entries True in the returned mask), in the [cols, rows] layout."""

    def __init__(self, rows: int, cols: int, sparsity: float, pattern: Pattern, device):
        numel = rows * cols
        self.pattern = pattern
        if pattern.is_nm:
            self.kept = numel * (pattern.m - pattern.n) / pattern.m  # the authors' k_spar (a float)
            self.pruned = numel // pattern.m * pattern.n
            self._nm = _Selector(rows, cols, 0.0, pattern, torch.zeros(cols, dtype=torch.bool, device=device))
        else:
            self.kept = round((1 - sparsity) * numel)  # the authors' np.round((1 - sp) * params)
            self.pruned = numel - self.kept

    def __call__(self, D: torch.Tensor) -> torch.Tensor:
        if self.pattern.is_nm:
            return self._nm.exact(D)  # N smallest |D| of every M inputs per output row
        return _lowest(D.abs(), self.pruned)


def alps_prune(weight: torch.Tensor, hessian: torch.Tensor | AlpsHessian, sparsity: float, pattern: Pattern,
               **options) -> PruneResult:
    """Prune and reconstruct one weight [outputs, inputs] with ALPS; the new weight keeps its dtype.

    options: see ALPS_OPTIONS (rho, max_iter, update_iter, switch_iter, percdamp, cg_iters, cg_rtol). With
    a prepared AlpsHessian its damping is used; info["percdamp"] reports it when it differs from the option.
    """
    opts = defaults(ALPS_OPTIONS) | check_options("alps", ALPS_OPTIONS, options)
    prepared = hessian if isinstance(hessian, AlpsHessian) else prepare_alps(hessian, opts["percdamp"])
    compute = compute_dtype(weight.dtype, prepared.normalized.dtype)
    rows, cols = weight.shape
    if prepared.normalized.shape != (cols, cols):
        raise ValueError(f"Hessian is {tuple(prepared.normalized.shape)} but the weight has {cols} inputs")
    pattern.check_width(cols)
    info = {"percdamp": prepared.percdamp} if prepared.percdamp != opts["percdamp"] else {}
    project = _Projection(rows, cols, sparsity, pattern, weight.device)
    if project.pruned == 0:
        return PruneResult(weight.detach().clone(), torch.zeros_like(weight, dtype=torch.bool), info)
    if project.kept == 0:  # nothing kept (a tiny layer at p near 1): their support test would divide by 0
        return PruneResult(torch.zeros_like(weight), torch.ones_like(weight, dtype=torch.bool), info)

    A = prepared.normalized.to(compute)
    scale = prepared.scale.to(compute)
    scaled = weight.detach().to(compute) * scale  # W s, [rows, cols]
    rhs = (scaled @ A).t()  # A B0, the authors' YtX^T
    B0 = scaled.t().contiguous()
    B, mask = _admm(A, rhs, B0, project, prepared, compute, opts)
    if opts["cg_iters"]:
        B = _pcg(A, rhs, B, ~mask, opts["cg_iters"], opts["cg_rtol"])
    B = B.masked_fill_(mask, 0)
    return PruneResult((B.t() / scale).to(weight.dtype), mask.t(), info)


def _admm(A, rhs, B0, project: _Projection, prepared: AlpsHessian, compute, opts):
    """The authors' ADMM loop with its penalty schedule; returns (P(B), pruned mask), both [cols, rows]."""
    rho, update_iter, switch_iter = opts["rho"], opts["update_iter"], opts["switch_iter"]
    inverse = prepared.inverse(rho, compute)
    start_mask = project(B0)
    D_start = B0.masked_fill(start_mask, 0)
    B, D, V = B0, D_start, torch.zeros_like(B0)
    checked = start_mask  # the support at the last check
    raised = False  # whether rho has ever been raised (their init_rho)
    for i in range(opts["max_iter"]):
        B = inverse @ (rhs - V + rho * D)
        D = (V + rho * B) / rho
        mask = project(D)
        D.masked_fill_(mask, 0)
        V = V + rho * (B - D)
        if (i + 1) % update_iter:
            continue
        changed = int((mask != checked).sum())
        share = changed / project.kept
        if share > RHO_RAISE[0][0]:
            raised, rho = True, rho * RHO_RAISE[0][1]
        elif share > RHO_RAISE[1][0]:
            raised, rho = True, rho * RHO_RAISE[1][1]
        elif changed > 0:
            if raised:
                rho *= RHO_SLOW
            else:  # restart from the start with a smaller penalty
                rho /= RHO_RESTART
                B, D, V = B0, D_start, torch.zeros_like(B0)
        else:
            if raised:
                break
            rho /= RHO_RESTART
        checked = mask
        rho = min(rho, RHO_MAX)
        inverse = prepared.inverse(rho, compute)
        if i >= switch_iter and share < STABLE_SHARE:
            break
    mask = project(B)
    return B.masked_fill(mask, 0), mask


def _pcg(A, rhs, Z0, keep, steps: int, rtol: float) -> torch.Tensor:
    """The authors' batched CG on A Z = rhs with Z = 0 off `keep`, from Z0 (one system per column)."""
    Z = Z0.clone()
    full = rhs - A @ Z  # -(A Z - rhs), the residual their stopping rule measures
    R = full * keep
    stop = rtol * torch.linalg.vector_norm(rhs, dim=1)  # per input, over outputs (their torch.norm(B, dim=1))
    P = rz_old = None
    for _ in range(steps):
        rz = (R * R).sum(0)
        if P is None:
            P = R
        else:
            beta = rz / torch.where(rz_old == 0, CG_ZERO, rz_old)
            P = R + beta[None] * P
        AP = A @ P
        curvature = (P * AP).sum(0)
        alpha = rz / torch.where(curvature == 0, CG_ZERO, curvature)
        Z = Z + alpha[None] * P
        R = (R - alpha[None] * AP) * keep
        full = full - alpha[None] * AP
        rz_old = rz
        if bool((torch.linalg.vector_norm(full, dim=1) <= stop).all()):
            break
    return Z


def objective(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T) in float64: the layer objective ALPS minimises (for tests and studies)."""
    delta = weight.double() - new_weight.double()
    return float(((delta @ hessian.double()) * delta).sum())

