"""Asymmetric calibration (--asymmetric): each layer reconstructs the dense model's output of that layer from
the inputs the pruned model gives it, instead of its own output on those inputs.

The papers' order (SparseGPT, ALPS) minimises ||(W - V) X||^2 on the pruned model's inputs X, so the error of
the blocks before is never corrected, only not made worse. Here the engine also carries the dense model's
hidden states (the blocks as they were, before this run pruned them) and, for each layer, accumulates
G = (2/N) sum (X_dense - X) X^T beside H; the method is then handed W* = W + W G H^-1 (statistics.asymmetric_weight)
as the weight to prune, for which minimising its own objective minimises ||W X_dense - V X||^2. GPTAQ (Li et
al., 2025) calibrates quantisation the same way. Block-at-once order only; the method must be one that
reconstructs (Method.reconstructs: its objective is tr((W - V) H (W - V)^T)).

Cost: each block runs twice more per calibration chunk (the dense forward, which also gives the dense
stream's next input, and the pruned-stream forward that feeds the statistics), and the dense stream's
hidden states take as much memory again as the pruned stream's.
"""
from __future__ import annotations

import weakref

import torch

from ..errors import UsageError
from ..methods.statistics import InputGap, asymmetric_weight
from ..models import get_weight, set_weight
from ..settings import spelled
from .capture import forward_block, store
from .stages import BlockVisit, prune_layers, propagate


def gather_asymmetric(visit: BlockVisit) -> None:
    """Feed each layer's statistic with the pruned stream's inputs and its InputGap with the dense
    stream's, advance the dense stream by this block as it was, and replace each layer's weight by its
    asymmetric target W*, which prune_layers then prunes."""
    if visit.inputs is None or visit.method.statistic is None:
        return
    visit.on_phase("statistics")
    inputs, device, statistic = visit.inputs, visit.device, visit.method.statistic
    if any(".experts." in name for name in visit.layers):
        raise UsageError(f"{spelled('asymmetric')}: block {visit.index} routes tokens to experts, and the dense "
                            "and pruned models may route a token differently, so their inputs to an expert do not "
                            "pair up; leave it out for mixture-of-experts models")
    if inputs.dense is None:  # the first block pruned: both models feed it the same inputs
        inputs.dense = list(inputs.hidden)
    offload = inputs.hidden[0].device.type == "cpu" and device.type == "cuda"
    stats: dict[str, object] = {}
    gaps: dict[str, InputGap] = {}
    feeds: dict[str, bool] = {}
    next_dense = []
    for chunk, (dense, hidden, call) in enumerate(zip(inputs.dense, inputs.hidden, inputs.calls[visit.index])):
        seen_dense: dict[str, torch.Tensor] = {}

        def keep(name):
            def fn(_module, args):
                seen_dense.setdefault(name, args[0].detach())
            return fn

        handles = [layer.register_forward_pre_hook(keep(name)) for name, layer in visit.layers.items()]
        try:
            next_dense.append(store(forward_block(visit.block, dense, call, device), offload))
        finally:
            for handle in handles:
                handle.remove()
        shared: list[tuple[weakref.ref, str]] = []
        sequences = hidden.shape[0]

        def feed(name):
            def fn(_module, args):
                x = args[0]
                if chunk == 0 and name not in stats:  # layers reading one tensor share one statistic
                    for ref, owner in shared:
                        if ref() is x:
                            stats[name], gaps[name], feeds[name] = stats[owner], gaps[owner], False
                            break
                    else:
                        stats[name] = statistic(x.shape[-1], device, x.dtype)
                        gaps[name] = InputGap(x.shape[-1], device, x.dtype)
                        feeds[name] = True
                        shared.append((weakref.ref(x), name))
                if feeds[name] and name in seen_dense:
                    stats[name].add(x, sequences)
                    gaps[name].add(seen_dense[name], x, sequences)
            return fn

        handles = [layer.register_forward_pre_hook(feed(name)) for name, layer in visit.layers.items()]
        try:
            forward_block(visit.block, hidden, call, device)
        finally:
            for handle in handles:
                handle.remove()
    inputs.dense = next_dense
    percdamp = visit.options.get("percdamp", 0.01)
    done: dict[int, torch.Tensor] = {}
    for name, layer in visit.layers.items():
        if id(stats[name]) not in done:
            done[id(stats[name])] = stats[name].value()
        hessian = done[id(stats[name])]
        set_weight(layer, asymmetric_weight(get_weight(layer), hessian, gaps[name].value(), percdamp))
    visit.stats.update(stats)


ASYMMETRIC_STAGES = (gather_asymmetric, prune_layers, propagate)
