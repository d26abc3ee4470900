"""What the Hessian-based methods share about numerics: the error for statistics no damping can repair,
and the damping's escalation, with the damped factorisation SparseGPT and ADMM share (ALPS damps in its
authors' arithmetic and escalates the same way; the engine and the structured refit
raise the same error for non-finite inputs)."""
from __future__ import annotations

import warnings

import torch

from ..errors import RunError
from .masks import compute_dtype


class NumericsError(RunError):
    """Statistics that no damping can repair (non-finite values, a degenerate Hessian)."""


def escalating_damping(percdamp: float, max_percdamp: float, attempt):
    """attempt(damping fraction) -> a result, or None when the damped Hessian is not positive-definite;
    on None the damping is raised 10x (from 0: to 0.01) up to max_percdamp, with a warning when the
    fraction used is not the one asked for. Returns (result, damping fraction used). Each method damps
    and factors in its own arithmetic (its authors'); the escalation is ours and shared."""
    damp_frac = percdamp
    while True:
        result = attempt(damp_frac)
        if result is not None:
            break
        next_frac = damp_frac * 10 if damp_frac > 0 else 0.01  # from no damping, start at 1%
        if next_frac > max_percdamp:
            raise NumericsError(f"the Hessian is not positive-definite even with damping {damp_frac:g}; "
                                "it is degenerate")
        damp_frac = next_frac
    if damp_frac != percdamp:
        warnings.warn(f"Hessian was not positive-definite; used damping {damp_frac:g} instead of {percdamp:g}")
    return result, damp_frac


def check_finite(hessian: torch.Tensor) -> None:
    if not torch.isfinite(hessian).all():
        raise NumericsError("the Hessian has NaN or inf entries (the layer's inputs are not finite)")


def damped_factor(hessian: torch.Tensor, percdamp: float, max_percdamp: float, factor):
    """Dead inputs (diag H = 0) get H[j, j] = 1; then H + damp*I with damp = percdamp * mean(diag H) is
    handed to `factor`, which returns its factorisation or None when it fails (not positive-definite);
    the damping escalates as escalating_damping says. Returns (factorisation, damped H, dead inputs,
    damping fraction used). Shared by SparseGPT and ADMM."""
    check_finite(hessian)
    H = hessian.detach().to(compute_dtype(hessian.dtype), copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)

    def attempt(damp_frac):
        damped = H + damp_frac * mean_diag * eye
        result = factor(damped)
        return None if result is None else (result, damped)

    (result, damped), damp_frac = escalating_damping(percdamp, max_percdamp, attempt)
    return result, damped, dead, damp_frac
