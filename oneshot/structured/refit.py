"""After removing units, put back what the consuming projection (o_proj, down_proj) lost.

Both functions are pure: the projection's weight [outputs, inputs] and input statistics in, the new
weight and bias out.

- Bias compensation (FLAP, An et al., 2024): a removed input channel j is replaced by its calibration
  mean, so the projection's bias gains W[:, removed] @ mean[removed].
- Least-squares refit (`reconstruct`): the kept columns (and the bias, when the layer has or gets
  one) are re-solved so that the layer's output on the calibration inputs stays as close as possible
  to what it was: min over W', b' of sum over tokens ||W' x_kept + b' - (W x + b)||^2. Everything it
  needs is the input Gram matrix G = sum x x^T, the input sum and the token count.
"""
from __future__ import annotations

import torch

from ..methods.numerics import NumericsError


def compensation(weight: torch.Tensor, mean: torch.Tensor, removed) -> torch.Tensor:
    """What the bias gains when the inputs `removed` are held at their mean: W[:, removed] @ mean[removed]."""
    removed = torch.as_tensor(removed, dtype=torch.long, device=weight.device)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dtype)[:, removed] @ mean.to(weight.device, dtype)[removed]


def least_squares(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, total: torch.Tensor,
                  count: int, kept, fit_bias: bool, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The refit of a projection y = W x + b to its kept inputs.

    weight [outputs, inputs] and bias (or None) are the layer before removal; gram = sum x x^T
    [inputs, inputs], total = sum x [inputs] and count = number of tokens describe its calibration
    inputs; kept: the input columns that stay. With fit_bias the bias is solved for as well (a
    constant input); otherwise it stays as it is. Ridge damping of `damp` * mean(diag) on the kept
    Gram keeps the system solvable when inputs are collinear. Returns (weight [outputs, kept], bias).
    Computed in float64.
    """
    kept = torch.as_tensor(kept, dtype=torch.long, device=weight.device)
    w = weight.to(torch.float64)
    g = gram.to(w.device, torch.float64)
    s = total.to(w.device, torch.float64)
    b = None if bias is None else bias.to(torch.float64)
    # Target cross-moments: sum (W x + b) x_kept^T and sum (W x + b).
    cross = w @ g[:, kept]
    target_sum = w @ s
    if b is not None:
        cross = cross + torch.outer(b, s[kept])
        target_sum = target_sum + count * b
    a = g[kept][:, kept]
    a = a + damp * a.diagonal().mean().clamp_min(1e-12) * torch.eye(len(kept), dtype=a.dtype, device=a.device)
    if fit_bias:
        # Augment with a constant input: [x_kept; 1].
        n = len(kept)
        full = torch.empty(n + 1, n + 1, dtype=a.dtype, device=a.device)
        full[:n, :n], full[:n, n], full[n, :n], full[n, n] = a, s[kept], s[kept], float(count)
        rhs = torch.cat([cross, target_sum[:, None]], dim=1)
        solution = _solve(full, rhs)
        new_weight, new_bias = solution[:, :n], solution[:, n]
    else:
        # The bias is kept, so it cancels from both sides: W' G_kk = W G_:k.
        new_weight, new_bias = _solve(a, w @ g[:, kept]), b
    new_weight = new_weight.to(weight.dtype)
    if new_bias is not None:
        new_bias = new_bias.to(weight.dtype if bias is None else bias.dtype)
    return new_weight, new_bias


def _solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with X a = rhs for a symmetric positive-definite a (Cholesky)."""
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 or not bool(torch.isfinite(rhs).all()):
        raise NumericsError("the least-squares refit of a consuming projection is singular or not finite; "
                            "run without --option reconstruct=true or with more calibration windows")
    return torch.cholesky_solve(rhs.t(), factor).t()
