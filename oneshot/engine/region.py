"""A decoder block as a trainable region: its calibration sequences one at a time, only its prunable
weights trainable (in a dtype small steps survive). Shared by Wanda++'s regional optimisation (methods/wandapp.py) and
the engine's block refit (--refit, engine/refit.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..methods.masks import compute_dtype
from .capture import forward_block


def sequences(visit) -> list[tuple[int, int]]:
    """(chunk, row) of every calibration sequence, in order."""
    return [(c, i) for c, hidden in enumerate(visit.inputs.hidden) for i in range(hidden.shape[0])]


def one_sequence(value, row: int, batch: int, dtype):
    """A block call's argument for one sequence of a chunk of `batch`: tensors of two or more dimensions
    whose first is the batch are sliced (position ids, rotary tables and masks shared across the batch
    have a first dimension of 1 and stay whole); floating tensors are cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        if batch > 1 and value.dim() >= 2 and value.shape[0] == batch:
            value = value[row:row + 1]
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        items = [one_sequence(v, row, batch, dtype) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [one_sequence(v, row, batch, dtype) for v in value]
    if isinstance(value, dict):
        return {k: one_sequence(v, row, batch, dtype) for k, v in value.items()}
    return value


def sample(visit, chunk: int, row: int, dtype):
    """The block's input and call arguments for one calibration sequence, on the device in `dtype`."""
    hidden = visit.inputs.hidden[chunk]
    args, kwargs = visit.inputs.calls[visit.index][chunk]
    batch = hidden.shape[0]
    call = (one_sequence(tuple(args), row, batch, dtype), one_sequence(dict(kwargs), row, batch, dtype))
    return hidden[row:row + 1].to(visit.device, dtype), call


def region_forward(visit) -> Callable:
    return lambda item: forward_block(visit.block, item[0], item[1], visit.device)


def prunable_parameters(visit) -> list:
    """The distinct parameters the block's prunable weights live in (a fused experts tensor once)."""
    from ..models import layer_parameter

    return list({id(p): p for p in (layer_parameter(layer) for layer in visit.layers.values())}.values())


def region_dtype(visit) -> torch.dtype:
    return compute_dtype(next(visit.block.parameters()).dtype)


@contextlib.contextmanager
def trainable(block, params, dtype):
    """Only `params` require grad, and every parameter of the block is in `dtype`; restored on exit."""
    saved = [(p, p.requires_grad, p.dtype) for p in block.parameters()]
    try:
        for p, _flag, original in saved:
            p.requires_grad_(False)
            if p.is_floating_point() and original != dtype:
                p.data = p.data.to(dtype)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag, original in saved:
            p.requires_grad_(flag)
            if p.dtype != original:
                p.data = p.data.to(original)
