"""The steps of one block visit. A visit runs a short, explicit sequence of stages over a BlockVisit:

    gather_statistics -> prune_layers -> propagate          (the papers' order, the default)

A stage is a function of the visit; new steps (quantise after pruning, a sublayer-by-sublayer order)
are new stages or new sequences, and the engine's loop does not change. A method may declare a whole
sequence of its own (Method.stages, e.g. Wanda++'s), which the engine then runs instead of the default.
Stages know blocks, layers and statistics, never a method's maths: the method is called through its
declared interface.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..methods import Method, Pattern, magnitude_prune
from ..methods.numerics import NumericsError
from ..models import get_weight, routed_through_projections, set_weight
from ..settings import spelled
from .capture import BlockInputs, Caught, forward_block, store
from .prune_report import PruneReport


@dataclass
class BlockVisit:
    """Everything a stage may read or change while one block is on the device."""

    index: int
    block: nn.Module
    layers: dict[str, nn.Module]  # prunable layers by qualified name inside the block
    device: torch.device
    method: Method
    options: dict  # the method's options, checked
    pattern: Pattern
    targets: dict[str, float]  # layer name -> sparsity for this block
    inputs: BlockInputs | None  # None when the method reads no activations
    report: PruneReport
    last: bool  # the model's last block: its outputs feed nothing
    stats: dict = field(default_factory=dict)  # layer name -> accumulator (shared by layers reading one input)
    on_phase: Callable[[str], None] = lambda phase: None
    scratch: dict = field(default_factory=dict)  # what a method's own stages hand each other (Method.stages)


Stage = Callable[[BlockVisit], None]


def gather_statistics(visit: BlockVisit, names: Sequence[str] | None = None) -> None:
    """Feed each layer's input to the method's statistic; layers reading the same tensor share one.
    Only the layers in `names` (default: all) are fed, and the forward stops after the last of them."""
    if visit.inputs is None or visit.method.statistic is None:
        return
    visit.on_phase("statistics")
    wanted = {name: visit.layers[name] for name in (visit.layers if names is None else names)}
    visit.stats.update(_accumulate(visit, wanted))


def _accumulate(visit: BlockVisit, layers: dict) -> dict:
    statistic, device = visit.method.statistic, visit.device
    stats: dict[str, object] = {}
    feeds: dict[str, bool] = {}
    seen: list[tuple[weakref.ref, object]] = []
    sequences = 0  # in the chunk being forwarded
    finite: dict[str, torch.Tensor] = {}
    order: list[str] = []  # hook calls during the first chunk
    stop_after = None  # the last layer to run, once known: nothing after it feeds a statistic

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0]
            if name not in stats:  # first chunk: identity of the input tensor decides sharing
                for ref, accumulator in seen:
                    if ref() is x:
                        stats[name], feeds[name] = accumulator, False
                        break
                else:
                    stats[name], feeds[name] = statistic(x.shape[-1], device, x.dtype), True
                    seen.append((weakref.ref(x), stats[name]))
            if feeds[name]:
                stats[name].add(x, sequences)
                finite[name] = finite.get(name, True) & torch.isfinite(x).all()  # no sync until the end
            if stop_after is None:
                order.append(name)
            elif name == stop_after:
                raise Caught  # skip the rest of the block: its output is not needed here
        return fn

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        # Fused experts run expert by expert through their projection layers, so the hooks above see
        # exactly the tokens routed to each expert.
        with routed_through_projections(layers.values()):
            for hidden, call in zip(visit.inputs.hidden, visit.inputs.calls[visit.index]):
                sequences = hidden.shape[0]
                try:
                    forward_block(visit.block, hidden, call, device)
                except Caught:
                    pass
                if stop_after is None and sorted(order) == sorted(layers):  # each layer ran exactly once
                    stop_after = order[-1]
    finally:
        for handle in handles:
            handle.remove()
    for name, ok in finite.items():
        if not bool(ok):
            raise NumericsError(f"block {visit.index}, layer {name}: its input contains NaN or inf; check the "
                                f"model's weights and {spelled('dtype')} (float16 overflows for some "
                                "bfloat16-trained models)")
    return stats


# What a layer that no calibration token reached (an expert the router never chose) gets instead of
# the method: its statistic is all zeros, which would make SparseGPT drop every input ("dead inputs")
# and leave Wanda's ranking to ties. Magnitude keeps the target and the pattern (so 2:4 kernels still
# apply) and keeps the largest weights, the best guess without data; the record notes each such layer.
NO_TOKENS_NOTE = {"fallback": "magnitude", "calibration_tokens": 0}


def prune_layers(visit: BlockVisit, names: Sequence[str] | None = None) -> None:
    """Ask the method for each layer's new weight and write it back; statistics are prepared once per
    shared accumulator and released after use. A layer whose statistic saw no token is pruned by
    magnitude (NO_TOKENS_NOTE)."""
    visit.on_phase("pruning")
    method, options = visit.method, visit.options
    names = list(visit.layers) if names is None else list(names)
    prepared = {}
    for name in names:
        layer, stat = visit.layers[name], visit.stats.get(name)
        target = visit.targets[name]
        if stat is not None and getattr(stat, "tokens", None) == 0:
            fallback = method.without_data or magnitude_prune
            result = fallback(get_weight(layer), target, visit.pattern)
            result = result._replace(info=dict(NO_TOKENS_NOTE))
        else:
            if stat is not None and id(stat) not in prepared:
                value = stat.value()
                prepared[id(stat)] = method.prepare(value, **options) if method.prepare else value
            per_layer = getattr(method, "per_layer", None)  # options that depend on the layer (DSnoT's skip_layer)
            layer_options = per_layer(name, options) if per_layer else options
            result = method.prune(get_weight(layer), prepared.get(id(stat)), target, visit.pattern, **layer_options)
        set_weight(layer, result.weight)
        visit.report.record(f"{visit.index}.{name}", result.weight, result.info, target, result.quantized)
    for name in names:
        visit.stats.pop(name, None)


def propagate(visit: BlockVisit) -> None:
    """Run the pruned block on its inputs: its outputs are the next block's inputs."""
    if visit.inputs is None or visit.last:
        return
    visit.on_phase("forward")
    offload = visit.inputs.hidden[0].device.type == "cpu" and visit.device.type == "cuda"
    calls = visit.inputs.calls[visit.index]
    visit.inputs.hidden = [store(forward_block(visit.block, h, call, visit.device), offload)
                           for h, call in zip(visit.inputs.hidden, calls)]
    check_finite(visit.inputs.hidden, f"the outputs of block {visit.index} after pruning")


def check_finite(tensors: list[torch.Tensor], what: str) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NumericsError(f"{what} contain NaN or inf; check the model's weights and {spelled('dtype')} "
                            "(float16 overflows for some bfloat16-trained models)")


DEFAULT_STAGES: tuple[Stage, ...] = (gather_statistics, prune_layers, propagate)
