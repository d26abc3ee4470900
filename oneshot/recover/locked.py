"""Locked masks: the zero pattern of a pruned model, captured once and re-imposed after every change.

Recovery must not undo pruning. `capture_masks` records, for every prunable linear inside the decoder
blocks, which weights are non-zero (a bool tensor in the parameter's own layout); `apply_masks` sets
the others back to exactly 0 after each optimiser step or LoRA merge, so unstructured sparsity and N:M
groups come out unchanged. A structured model has no zeros beyond what it happens to hold: its masks
are all (or nearly all) True and recovery trains it like a dense model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import decoder_blocks, layer_parameter, prunable_layers


def masked_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight parameter of every prunable layer in the decoder blocks, by its name in `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for block in decoder_blocks(model):
        for layer in prunable_layers(block).values():
            parameter = layer_parameter(layer)
            found[names[id(parameter)]] = parameter
    return found


def masked_layers(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[nn.Module, torch.Tensor]]:
    """(layer, keep) for every prunable layer of the blocks whose weight has a mask in `masks`."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = []
    for block in decoder_blocks(model):
        for layer in prunable_layers(block).values():
            name = names.get(id(layer_parameter(layer)))
            if name in masks:
                found.append((layer, masks[name]))
    return found


def capture_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> bool tensor, True where the weight is kept (non-zero)."""
    return {name: parameter.detach() != 0 for name, parameter in masked_parameters(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Pruned entries to exactly +0.0 (masked_fill, not a multiply, which would leave -0.0)."""
    parameters = dict(model.named_parameters())
    for name, keep in masks.items():
        parameters[name].data.masked_fill_(~keep.to(parameters[name].device), 0.0)


def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradient of pruned entries, so the optimiser's moments never see them."""
    parameters = dict(model.named_parameters())
    for name, keep in masks.items():
        grad = parameters[name].grad
        if grad is not None:
            grad.masked_fill_(~keep.to(grad.device), 0.0)


def masks_hold(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """Whether every pruned entry is exactly zero."""
    parameters = dict(model.named_parameters())
    return all(not bool(parameters[name].detach()[~keep.to(parameters[name].device)].any())
               for name, keep in masks.items())


def zero_fraction(model: nn.Module) -> float:
    """Zeros over numel of the prunable layers' weights: the exact sparsity of the pattern."""
    zeros = total = 0
    for parameter in masked_parameters(model).values():
        zeros += int((parameter.detach() == 0).sum())
        total += parameter.numel()
    return zeros / total if total else 0.0
