"""Sublayer-sequential calibration: each group of layers is pruned before any calibration data passes
through it, so that its statistic comes from the inputs the pruned layers before it produce.

Inside a block, layers that read the same tensor form a group (q/k/v; gate/up), and the groups run in
forward order: q/k/v are pruned from the block's inputs, then o_proj's statistic is gathered from the
attention with its pruned inputs, then the MLP likewise (SparseGPT's "true sequential" order).

The block runs once. Every calibration chunk's forward is a thread; a hook at the first layer of each
group feeds that group's statistic and pauses the chunk there. When every chunk has paused at a group,
the group is pruned and the chunks go on. Only one chunk computes at any moment (they take turns), so
the device sees the same work as one plain forward of the calibration set; at the end each chunk's
output, computed with every layer already pruned, is the next block's input. No family needs code of
its own: the groups are found by watching which layers read the same tensor on one chunk first.
With --refit, the pruned block's kept weights are then fitted to its target output (engine/refit.py)
before its outputs go on.
"""
from __future__ import annotations

import threading

import torch

from ..errors import UsageError
from ..methods.numerics import NumericsError
from ..methods.statistics import InputGap, asymmetric_weight
from ..models import get_weight, routed_through_projections, set_weight
from ..settings import spelled
from .capture import Caught, forward_block, store
from .refit import Refit, refit_block
from .stages import BlockVisit, check_finite, prune_layers

# Grouping is a property of a block's forward code, so blocks of one class with the same layers share it:
# it is found once (a forward of one chunk) instead of once per block. Not for experts, whose routing
# is checked on each block's first chunk.
_GROUPS_BY_BLOCK_KIND: dict[tuple, list[list[str]]] = {}


def _groups(visit: BlockVisit) -> list[list[str]]:
    kind = (type(visit.block), tuple(visit.layers))
    cacheable = not any(".experts." in name for name in visit.layers)
    if cacheable and kind in _GROUPS_BY_BLOCK_KIND:
        return [list(group) for group in _GROUPS_BY_BLOCK_KIND[kind]]
    groups = _find_groups(visit)
    if cacheable:
        _GROUPS_BY_BLOCK_KIND[kind] = [list(group) for group in groups]
    return groups


def _find_groups(visit: BlockVisit) -> list[list[str]]:
    """Layers in first-call order, grouped by the tensor they read (found on the first chunk)."""
    order, inputs = [], []

    def hook(name):
        def fn(_module, args):
            if name in order:
                return
            order.append(name)
            inputs.append(args[0])
            if len(order) == len(visit.layers):
                raise Caught  # every layer seen: the rest of the forward is not needed
        return fn

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in visit.layers.items()]
    try:
        forward_block(visit.block, visit.inputs.hidden[0], visit.inputs.calls[visit.index][0], visit.device)
    except Caught:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if sorted(order) != sorted(visit.layers):
        missing = sorted(set(visit.layers) - set(order))
        raise NumericsError(f"block {visit.index}: layers {', '.join(missing)} did not run on the first calibration "
                            "chunk; sublayer-sequential calibration needs every layer to see every chunk")
    groups: list[list[str]] = []
    for name, x in zip(order, inputs):
        for group in groups:
            if inputs[order.index(group[0])] is x:
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


class _Chunk(threading.Thread):
    """One chunk's forward, run a step at a time: from pause to pause, on the caller's command."""

    def __init__(self, work):
        super().__init__(daemon=True)  # an interrupted run must not wait for paused chunks
        self.work, self.result, self.error = work, None, None
        self._go, self._paused = threading.Event(), threading.Event()

    def run(self):
        self._go.wait()
        self._go.clear()
        try:
            with torch.no_grad():  # grad mode is per thread
                self.result = self.work()
        except BaseException as exc:  # handed to the caller, who raises it
            self.error = exc
        finally:
            self.work = None
            self._paused.set()

    def pause(self):
        """Called inside this thread: hand control back and wait for the next step."""
        self._paused.set()
        self._go.wait()
        self._go.clear()

    def step(self):
        """Called by the engine: run this chunk to its next pause (or its end)."""
        self._paused.clear()
        self._go.set()
        self._paused.wait()
        if self.error is not None:
            raise self.error


def experts_refused(setting: str, where: str) -> str:
    """Why --asymmetric and --refit leave mixture-of-experts blocks alone (the plan says it before loading)."""
    why = ("the dense and pruned models may route a token differently, so their inputs to an expert do not "
           "pair up") if setting == "asymmetric" else "a refit would train through the router's choices"
    return f"{spelled(setting)}: {where} routes tokens to experts, and {why}; leave it out for mixture-of-experts models"


def sublayer_sequential(visit: BlockVisit, asymmetric: bool = False, refit: Refit | None = None) -> None:
    """A stage that replaces gather_statistics -> prune_layers -> propagate for one block."""
    if visit.inputs is None or visit.method.statistic is None:  # nothing to calibrate: prune as usual
        prune_layers(visit)
        return
    if refit is not None and any(".experts." in name for name in visit.layers):
        raise UsageError(experts_refused("refit", f"block {visit.index}"))
    # Fused experts run expert by expert through their projection layers, so that the hooks see
    # exactly the tokens routed to each expert (as in gather_statistics).
    with routed_through_projections(visit.layers.values()):
        _sublayer_sequential(visit, asymmetric, refit)


def asymmetric_sequential(visit: BlockVisit, refit: Refit | None = None) -> None:
    """sublayer_sequential, each group reconstructing the dense model's output of its layers (--asymmetric)."""
    if any(".experts." in name for name in visit.layers):
        raise UsageError(experts_refused("asymmetric", f"block {visit.index}"))
    sublayer_sequential(visit, asymmetric=True, refit=refit)


def sequential_stages(asymmetric: bool = False, refit: Refit | None = None) -> tuple:
    """The stage sequence of --sequential (with --asymmetric, --refit): one stage, named by what it does
    (a checkpoint's fingerprint keeps the name, so a resumed run continues only the same refit)."""
    stage = asymmetric_sequential if asymmetric else sublayer_sequential
    if refit is None or refit.epochs == 0:
        return (stage,)

    def refitting(visit: BlockVisit) -> None:
        stage(visit, refit=refit)

    refitting.__name__ = f"{stage.__name__}+refit(epochs={refit.epochs},lr={refit.lr!r},seed={refit.seed})"
    return (refitting,)


def _dense_pass(visit: BlockVisit, firsts: list[str]) -> list[list[torch.Tensor]]:
    """--asymmetric: run the block as it is (not yet pruned) on the dense model's inputs, chunk by chunk;
    keep each group's input ([chunk][group]) and advance the dense stream to the block's dense output."""
    inputs, device = visit.inputs, visit.device
    if inputs.dense is None:  # the first block pruned: both models feed it the same inputs
        inputs.dense = list(inputs.hidden)
    offload = inputs.hidden[0].device.type == "cpu" and device.type == "cuda"
    kept, outputs = [], []
    for dense, call in zip(inputs.dense, inputs.calls[visit.index]):
        seen: dict[str, torch.Tensor] = {}
        handles = [visit.layers[name].register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].detach())) for name in firsts]
        try:
            outputs.append(store(forward_block(visit.block, dense, call, device), offload))
        finally:
            for handle in handles:
                handle.remove()
        kept.append([seen[name] for name in firsts])
    inputs.dense = outputs
    return kept


def _sublayer_sequential(visit: BlockVisit, asymmetric: bool, refit: Refit | None) -> None:
    groups = _groups(visit)
    first_of = {group[0]: g for g, group in enumerate(groups)}
    statistic, device = visit.method.statistic, visit.device
    accumulators = [None] * len(groups)
    gaps = [None] * len(groups)  # --asymmetric: InputGap per group
    dense_inputs = _dense_pass(visit, [group[0] for group in groups]) if asymmetric else None
    calls = visit.inputs.calls[visit.index]
    offload = visit.inputs.hidden[0].device.type == "cpu" and device.type == "cuda"
    # --refit's target: the dense model's output of this block (--asymmetric: _dense_pass has advanced the
    # dense stream to it), else the unpruned block's output on the same inputs
    targets = None if refit is None else visit.inputs.dense if asymmetric else \
        [store(forward_block(visit.block, hidden, call, device), offload)
         for hidden, call in zip(visit.inputs.hidden, calls)]
    finite = [True] * len(groups)
    chunks = []

    def hook(name):
        g = first_of[name]

        def fn(_module, args):
            x = args[0]
            if accumulators[g] is None:
                accumulators[g] = statistic(x.shape[-1], device, x.dtype)
                if asymmetric:
                    gaps[g] = InputGap(x.shape[-1], device, x.dtype)
            chunk = threading.current_thread()
            accumulators[g].add(x, sequences[chunk])
            if asymmetric:
                gaps[g].add(dense_inputs[index_of[chunk]][g], x, sequences[chunk])
            finite[g] = finite[g] & torch.isfinite(x).all()
            chunk.pause()
        return fn

    sequences, index_of = {}, {}
    for hidden, call in zip(visit.inputs.hidden, calls):
        chunk = _Chunk(lambda hidden=hidden, call=call: forward_block(visit.block, hidden, call, device))
        sequences[chunk], index_of[chunk] = hidden.shape[0], len(chunks)
        chunks.append(chunk)
    handles = [visit.layers[name].register_forward_pre_hook(hook(name)) for name in first_of]
    try:
        for chunk in chunks:
            chunk.start()
        for g, group in enumerate(groups):
            visit.on_phase(f"group {g + 1}/{len(groups)}")
            for chunk in chunks:
                chunk.step()  # each chunk runs on to this group's first layer and feeds its statistic
            if not bool(finite[g]):
                raise NumericsError(f"block {visit.index}, layer {group[0]}: its input contains NaN or inf; check "
                                    f"the model's weights and {spelled('dtype')}")
            for name in group:
                visit.stats[name] = accumulators[g]
            if asymmetric:  # the weight whose pruning reconstructs the dense output: W* = W + W G H^-1
                hessian, gap = accumulators[g].value(), gaps[g].value()
                for name in group:
                    layer = visit.layers[name]
                    set_weight(layer, asymmetric_weight(get_weight(layer), hessian, gap,
                                                        visit.options.get("percdamp", 0.01)))
                gaps[g] = None
            prune_layers(visit, group)
            accumulators[g] = None
        visit.on_phase("forward")
        for chunk in chunks:
            chunk.step()  # on to the block's output, every layer pruned
    finally:
        for handle in handles:
            handle.remove()
    outputs = [chunk.result for chunk in chunks]
    if refit is not None:
        refit_block(visit, targets, refit)
        visit.on_phase("forward")
        with torch.no_grad():
            outputs = [] if visit.last else [forward_block(visit.block, hidden, call, device)
                                               for hidden, call in zip(visit.inputs.hidden, calls)]
    if not visit.last:
        visit.inputs.hidden = [store(output, offload) for output in outputs]
        check_finite(visit.inputs.hidden, f"the outputs of block {visit.index} after pruning")


SEQUENTIAL_STAGES = sequential_stages()
ASYMMETRIC_STAGES = sequential_stages(asymmetric=True)
