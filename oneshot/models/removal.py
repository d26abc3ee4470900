"""Acting on a structure map (structure.py): remove units from a block's layers, remove whole blocks, and
give the model the rewritten config, so the result is a smaller dense model that plain transformers loads.
Nothing here names a family: the map and the config say everything.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .adapter import ModelError, _is_conv1d, decoder_blocks, get_weight
from .structure import ROWS, Coupling, _ConfigView, _kept, rewrite_config


@torch.no_grad()
def remove_units(block: nn.Module, coupling: Coupling, keep) -> None:
    """Shrink `block` in place to the units in `keep` (unit indices; order and repeats do not matter).

    Every member layer gets new, smaller parameters (output biases are sliced with their rows) and
    the attributes transformers reads at forward time follow, so the block runs as it is. The model's
    config is not touched: call `update_model_config(model, rewrite_config(...))` once all blocks agree.
    """
    if not coupling.removable:
        raise ModelError(f"{coupling.kind} cannot be removed: {coupling.reason}")
    kept = _kept(keep, coupling.num_units, coupling.kind)
    modules = dict(block.named_modules())
    grouped = coupling.layers()
    for (layer, axis), members in grouped.items():  # check all before changing any
        size = get_weight(modules[layer]).shape[axis]
        if size != sum(m.indices.numel() for m in members):
            raise ModelError(f"{layer} has {size} along axis {axis}, not what the map describes: already shrunk?")
    for (layer, axis), members in grouped.items():
        # Units partition the axis and each unit's indices ascend, so sorting the kept ones keeps
        # every fused layout ([q|k|v], per-head interleaving, [gate|up]) in its own order.
        index = torch.sort(torch.cat([m.of(kept) for m in members])).values
        _select(modules[layer], axis, index)
    for counter in coupling.counters:
        module, value = modules[counter.module], counter.per_unit * len(kept)
        if counter.attribute.startswith("config."):
            _override_config(module, counter.attribute[len("config."):], value)
        elif hasattr(module, counter.attribute):  # set only where this version keeps such an attribute
            setattr(module, counter.attribute, value)


def _select(layer: nn.Module, axis: int, index: torch.Tensor) -> None:
    """Replace the layer's parameters by the rows (axis ROWS) or columns (COLS) in `index`."""
    stored_axis = 1 - axis if _is_conv1d(layer) else axis  # Conv1D stores [in, out]
    old = layer.weight
    layer.weight = nn.Parameter(old.data.index_select(stored_axis, index.to(old.device)),
                                requires_grad=old.requires_grad)
    if axis == ROWS and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data.index_select(0, index.to(old.device)),
                                  requires_grad=layer.bias.requires_grad)
    outputs, inputs = get_weight(layer).shape
    if _is_conv1d(layer):
        layer.nf, layer.nx = outputs, inputs  # Conv1D's forward reads nf
    else:
        layer.out_features, layer.in_features = outputs, inputs


def update_model_config(model: nn.Module, config) -> None:
    """Give `model` the values of `config`, in place: its modules share one config object and keep it."""
    target = model.config
    for key, value in vars(config).items():
        # Private entries are runtime state of the model's own config (attention implementation, ...).
        if key.startswith("_"):
            continue
        if key not in vars(target) or vars(target)[key] != value:
            setattr(target, key, copy.deepcopy(value))


@torch.no_grad()
def remove_blocks(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the decoder blocks `keep` (original indices), in order; fix indices and the config."""
    blocks = decoder_blocks(model)
    kept = _kept(list(keep), len(blocks), "blocks").tolist()
    config = rewrite_config(model.config, kept_blocks=kept)  # refuses before anything changes
    for index in reversed(range(len(blocks))):
        if index not in kept:
            del blocks[index]  # ModuleList renumbers the rest
    for position, block in enumerate(blocks):
        for module in block.modules():
            # The KV cache is indexed by layer_idx; per-layer types stay with the block (the config's
            # layer_types follow the kept blocks).
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    update_model_config(model, config)


def _override_config(module: nn.Module, key: str, value) -> None:
    if isinstance(module.config, _ConfigView):
        module.config._values[key] = value
    else:
        module.config = _ConfigView(module.config, {key: value})
