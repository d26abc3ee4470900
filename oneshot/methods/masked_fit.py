"""Fitting a region's kept weights to target outputs with its pruned weights held at 0: the loop that
Wanda++'s regional optimisation (wandapp.py) and the engine's block refit (--refit, engine/refit.py) share."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .masks import compute_dtype


def regional_optimise(forward: Callable, pairs: Iterable, params: Sequence[torch.Tensor],
                      pruned: Sequence[torch.Tensor], optimiser: torch.optim.Optimizer,
                      update: str = "kept") -> list[float]:
    """One optimiser step per (input, target) pair on sum((forward(input) - target)^2), moving only `params`.

    `pruned[i]` (bool, shaped like params[i]) marks weights that must stay 0: with update "kept" they get
    no gradient and are set to 0 again after every step (exactly 0 throughout); with "all" every weight
    moves and the caller prunes again. Returns each step's loss (before its step)."""
    if update not in ("kept", "all"):
        raise ValueError(f"update must be 'kept' or 'all', not {update!r}")
    losses = []
    with torch.enable_grad():
        for x, target in pairs:
            out = forward(x)
            dtype = compute_dtype(out.dtype)
            loss = (out.to(dtype) - target.to(out.device, dtype)).pow(2).sum()
            grads = torch.autograd.grad(loss, params)
            for p, grad, mask in zip(params, grads, pruned):
                p.grad = grad.masked_fill(mask, 0) if update == "kept" else grad
            optimiser.step()
            with torch.no_grad():
                for p, mask in zip(params, pruned):
                    p.grad = None
                    if update == "kept":
                        p.masked_fill_(mask, 0)
            losses.append(loss.detach())
    return [float(v) for v in losses]  # one host sync, at the end
