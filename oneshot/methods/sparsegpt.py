"""SparseGPT (Frantar & Alistarh, 2023): prune one layer and reconstruct it with OBS updates.

Given W (rows = outputs, cols = inputs) and the layer Hessian H = (2/N) sum X X^T, columns are
visited left to right in blocks. Inside a block each pruned column's error is spread over the
remaining columns of the block through the upper Cholesky factor U of H^-1; the block's total
error is applied to the columns after it in one matrix product (the lazy batch update).

We hold W transposed ([cols, rows]) so that a column, and the rest of a block, are contiguous in
memory: the per-column update is then one dense rank-1 update.

The same sweep quantises (oneshot.quantize): a `quantize_column` hook moves each column, once masked,
onto a quantisation grid, and the error of both is propagated (the paper's joint mode); with a
`fixed_mask` and sparsity 0 it is GPTQ on weights already pruned.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .masks import Pattern, PruneResult, compute_dtype, threshold_mask
from .numerics import damped_factor
from .options import Option

SPARSEGPT_OPTIONS = (
    Option("percdamp", float, 0.01, "damping, as a fraction of mean(diag H) added to the diagonal", above=0.0),
    Option("blocksize", int, 128, "columns per lazy-update block (N:M rounds it down to a multiple of M)", minimum=1),
    Option("max_percdamp", float, 10.0, "give up once damping would exceed this fraction", above=0.0),
    Option("kernel", str, "auto", "column loop: auto (fused Triton block on CUDA when it passes its "
           "self-check) or torch", choices=("auto", "torch")),
)


@dataclass(frozen=True)
class InverseHessian:
    """What every layer sharing one Hessian needs; computed once per distinct layer input."""

    upper: torch.Tensor  # U = chol((H + damp*I)^-1), upper triangular, fp32 (fp64 for an fp64 H)
    dead: torch.Tensor  # bool [cols]: inputs with diag(H) == 0, whose weights are dropped
    percdamp: float  # the damping fraction actually used


def _inverse_factor(damped: torch.Tensor) -> torch.Tensor | None:
    """U = chol(cholesky_inverse(chol(H)), upper), or None if either factorisation fails."""
    lower, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return upper if info.item() == 0 and torch.isfinite(upper).all() else None


def prepare_hessian(hessian: torch.Tensor, percdamp: float = 0.01, max_percdamp: float = 10.0,
                    **_options) -> InverseHessian:
    """Dead inputs get H[j, j] = 1; then U = chol(cholesky_inverse(chol(H + damp*I)), upper) with
    damp = percdamp * mean(diag H). If H is not positive-definite, retry with 10x the damping up to
    max_percdamp, and warn.
    """
    upper, _damped, dead, damp_frac = damped_factor(hessian, percdamp, max_percdamp, _inverse_factor)
    return InverseHessian(upper, dead, damp_frac)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | InverseHessian,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    kernel: str = "auto",
    max_percdamp: float = 10.0,
    quantize_column=None,
    fixed_mask: torch.Tensor | None = None,
) -> PruneResult:
    """Prune and reconstruct one weight [outputs, inputs]; the new weight keeps its dtype.

    kernel: "torch" runs the column loop in PyTorch; "auto" uses the fused Triton block on CUDA when
    it is available and has passed its first-use self-check, else the PyTorch loop.
    quantize_column: None, or a hook with `start(Wt, blocksize, m)` (called once with the transposed
    weight; returns the blocksize to use) and `(j, rest, mask_rest) -> q`, which returns column j
    (rest[0], already updated) masked and quantised; rest and mask_rest are the block from column j on.
    fixed_mask: bool [outputs, inputs]: prune exactly these weights (no selection; sparsity unused).
    """
    inverse = hessian if isinstance(hessian, InverseHessian) else prepare_hessian(hessian, percdamp, max_percdamp)
    U = inverse.upper
    compute = compute_dtype(weight.dtype, U.dtype)
    U = U.to(compute)
    # a copy even when weight is already a transposed [cols, rows] view (a previous result): never write into it
    Wt = weight.detach().to(compute).t().clone(memory_format=torch.contiguous_format)  # [cols, rows]
    cols, rows = Wt.shape
    if pattern.is_nm:
        pattern.check_width(cols)
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)  # N:M groups never straddle blocks
    Wt[inverse.dead] = 0
    if quantize_column is not None:
        blocksize = quantize_column.start(Wt, blocksize, pattern.m)  # no quantisation group straddles two blocks
    fixed_t = None if fixed_mask is None else fixed_mask.t().to(Wt.device)
    mask_t = torch.zeros(cols, rows, dtype=torch.bool, device=Wt.device)
    fused = kernel == "auto" and Wt.is_cuda and compute == torch.float32 and quantize_column is None and fixed_t is None
    obs_block = _fused_block() if fused else _obs_block_torch

    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        U1 = U[b0:b1, b0:b1]
        extra = {}
        if quantize_column is not None or fixed_t is not None:
            extra = {"offset": b0, "quantize_column": quantize_column,
                     "fixed": None if fixed_t is None else fixed_t[b0:b1]}
        Q1, Err1, mask1 = obs_block(Wt[b0:b1].clone(), U1, torch.diag(U1), sparsity, pattern.n, pattern.m, **extra)
        Wt[b0:b1] = Q1
        Wt[b1:] -= U[b0:b1, b1:].t() @ Err1  # the lazy batch update
        mask_t[b0:b1] = mask1

    info = {}
    if inverse.percdamp != percdamp:
        info["percdamp"] = inverse.percdamp
    if inverse.dead.any():
        info["dead_inputs"] = int(inverse.dead.sum())
    return PruneResult(Wt.t().to(weight.dtype), mask_t.t(), info)


def _obs_block_torch(W1: torch.Tensor, U1: torch.Tensor, d: torch.Tensor, sparsity: float, n: int, m: int,
                     offset: int = 0, quantize_column=None, fixed: torch.Tensor | None = None):
    """The OBS column loop over one block W1 [width, rows]: returns (Q1, Err1, mask1). The block starts
    at column `offset`; `fixed` is its mask when given; `quantize_column` (see sparsegpt_prune) turns
    each masked column into its quantised values."""
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    d = d.reshape(-1, 1)
    if fixed is not None:
        mask1, m = fixed, 0
    elif m:
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
    else:
        mask1 = threshold_mask(W1 ** 2 / d ** 2, sparsity)
    for i in range(W1.shape[0]):
        if m and i % m == 0:
            # Adaptive N:M: each group's mask comes from the weights as updated so far.
            scores = W1[i:i + m] ** 2 / d[i:i + m] ** 2
            lowest = torch.topk(scores, n, dim=0, largest=False).indices
            mask1.scatter_(0, i + lowest, True)
        w = W1[i]
        if quantize_column is None:
            q = w.masked_fill(mask1[i], 0)  # no boolean indexing: no host sync per column
        else:
            q = quantize_column(offset + i, W1[i:], mask1[i:])
        err = (w - q) / d[i]
        W1[i:].addr_(U1[i, i:], err, alpha=-1)
        Q1[i] = q
        Err1[i] = err
    return Q1, Err1, mask1


_FUSED = None  # the fused block once it has passed its self-check, or the PyTorch loop
_FUSED_STATUS: dict = {}  # the self-check's outcome (fused_block_status)

# The fused block is used when, on a test layer, it agrees with the PyTorch loop within these tolerances
# rather than exactly: a GPU's float ordering (and the kernel's x*x*(1/d^2) against the loop's x^2/d^2)
# may flip near-ties at the threshold, which changes the mask in a few entries and the error not at all.
SELF_CHECK_OVERLAP = 0.99  # least share of identical mask entries
SELF_CHECK_RTOL = 0.05  # the kernel's reconstruction error may exceed the loop's by at most this fraction


def block_agreement(got: torch.Tensor, want: torch.Tensor, mask_got: torch.Tensor, mask_want: torch.Tensor,
                    W: torch.Tensor, X: torch.Tensor) -> dict:
    """How two prunings of one weight agree. W, got, want: [cols, rows] (the transposed layout), the
    weight before and after each; X: [tokens, cols] the layer's inputs. Returns the share of identical
    mask entries and each result's relative reconstruction error ||X (W - W_hat)|| / ||X W||."""
    reference = torch.linalg.norm(X @ W)
    return {"mask_overlap": (mask_got == mask_want).float().mean().item(),
            "error": (torch.linalg.norm(X @ (W - got)) / reference).item(),
            "error_torch": (torch.linalg.norm(X @ (W - want)) / reference).item()}


def _sweep(obs_block, W: torch.Tensor, U: torch.Tensor, sparsity: float, n: int, m: int, blocksize: int):
    """sparsegpt_prune's column sweep over W [cols, rows] with a given block function: (W_hat, mask)."""
    W, mask = W.clone(), torch.zeros_like(W, dtype=torch.bool)
    for b0 in range(0, W.shape[0], blocksize):
        b1 = min(b0 + blocksize, W.shape[0])
        U1 = U[b0:b1, b0:b1]
        Q1, Err1, mask[b0:b1] = obs_block(W[b0:b1].clone(), U1, torch.diag(U1), sparsity, n, m)
        W[b0:b1] = Q1
        W[b1:] -= U[b0:b1, b1:].t() @ Err1
    return W, mask


def self_check(obs_block, device="cuda") -> dict:
    """Run `obs_block` beside the PyTorch loop on a test layer (128 inputs in two column blocks, so the
    lazy update is exercised; 96 outputs), unstructured 50% and 2:4. Returns {"ok", "reason", and per
    pattern block_agreement's numbers}; ok when every mask overlap is at least SELF_CHECK_OVERLAP and
    every error within SELF_CHECK_RTOL of the loop's."""
    generator = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(512, 128, device=device, generator=generator)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
        X.t() @ X / 512 + 0.01 * torch.eye(128, device=device))), upper=True)
    W = torch.randn(128, 96, device=device, generator=generator)
    status, problems = {}, []
    for label, n, m in (("unstructured", 0, 0), ("2:4", 2, 4)):
        got, mask_got = _sweep(obs_block, W, U, 0.5, n, m, 64)
        want, mask_want = _sweep(_obs_block_torch, W, U, 0.5, n, m, 64)
        numbers = block_agreement(got, want, mask_got, mask_want, W, X)
        status[label] = numbers
        if not torch.isfinite(got).all():
            problems.append(f"{label}: non-finite weights")
        elif numbers["mask_overlap"] < SELF_CHECK_OVERLAP:
            problems.append(f"{label}: mask overlap {numbers['mask_overlap']:.4f} < {SELF_CHECK_OVERLAP}")
        elif numbers["error"] > numbers["error_torch"] * (1 + SELF_CHECK_RTOL):
            problems.append(f"{label}: reconstruction error {numbers['error']:.4g} > the loop's "
                            f"{numbers['error_torch']:.4g} x {1 + SELF_CHECK_RTOL}")
    ok = not problems
    reason = ("agrees with the PyTorch loop within tolerance" if ok else
              "disagrees with the PyTorch loop: " + "; ".join(problems))
    return {"ok": ok, "reason": reason, **status}


def fused_block_status() -> dict:
    """The fused block's self-check outcome in this process ({} before any CUDA SparseGPT run):
    {"kernel": "triton" or "torch", "reason": ..., and self_check's numbers when it ran}."""
    return dict(_FUSED_STATUS)


def _fused_block():
    """The Triton block if it imports, compiles and agrees with the PyTorch loop on a test layer
    (self_check); else the PyTorch loop, with a warning that gives the reason."""
    global _FUSED
    if _FUSED is None:
        _FUSED = _obs_block_torch
        try:
            from .sparsegpt_kernel import obs_block

            outcome = self_check(obs_block, "cuda")
            _FUSED_STATUS.update(outcome)
            if not outcome["ok"]:
                raise RuntimeError(outcome["reason"])
            _FUSED = obs_block
            _FUSED_STATUS["kernel"] = "triton"
        except Exception as exc:  # no Triton, no compiler, or a mismatch: the PyTorch loop is always right
            reason = f"{type(exc).__name__}: {exc}"
            _FUSED_STATUS.update({"kernel": "torch", "ok": False, "reason": reason})
            warnings.warn(f"SparseGPT uses the PyTorch column loop: fused Triton block unavailable ({reason})")
    return _FUSED
