"""The layer-by-layer streaming pass that every method shares.

1. Catch what the model feeds its decoder blocks (capture.py).
2. For each block: move it to the device, run the visit's stages (stages.py: gather statistics,
   prune, propagate to the next block by default), save a checkpoint if asked, move it back.

The engine knows nothing of any method's maths: a method is a statistic class plus a function
(weight, statistic, sparsity, pattern, **options) -> (weight, mask, info). Each layer gets its own
target sparsity (from an allocation). Only one block is ever on the device. A model whose blocks stay
on disk (models/lazy.py) has each block read when the engine reaches it, kept (written to a spill
shard) once pruned, and released: host memory holds one block too.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint
from ..methods import Method, Pattern
from ..models import decoder_blocks, get_weight, prunable_layers
from ..models.lazy import block_weights, materialised
from ..settings import spelled
from .capture import BlockInputs, capture_block_inputs, forward_block, store
from .memory import ResourceError, activations_fit, default_batch_size
from .prune_report import PruneReport
from .stages import DEFAULT_STAGES, BlockVisit, Stage, check_finite, gather_statistics


def layer_names(model: nn.Module) -> list[str]:
    """Every prunable layer as "block.layer" (an expert's: "3.mlp.experts.7.down_proj"), in order: the keys
    of per-layer targets."""
    return [f"{index}.{name}" for index, block in enumerate(decoder_blocks(model)) for name in prunable_layers(block)]


def uniform_targets(model: nn.Module, sparsity: float) -> dict[str, float]:
    return dict.fromkeys(layer_names(model), float(sparsity))


def _inputs(model, input_ids, device, batch_size) -> tuple[BlockInputs, bool, int]:
    batch_size = batch_size or default_batch_size(model, input_ids.shape[1], device)
    offload = device.type == "cuda" and not activations_fit(model, input_ids, device)
    return capture_block_inputs(model, input_ids, device, batch_size, offload), offload, batch_size


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: Method,
    sparsity: float | Mapping[str, float],
    pattern: Pattern,
    input_ids: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    options: dict | None = None,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
    on_block_done: Callable[[int], None] | None = None,
    stages: Sequence[Stage] | None = None,
) -> PruneReport:
    """Prune every decoder block's linear layers (and each expert's projections) in place; the model stays
    on the CPU. Routers are never pruned.

    `sparsity` is one fraction for every layer, or a target per layer keyed "block.layer" (see
    layer_names). N:M patterns prune N/M of every layer. With `checkpoint`, each finished block is
    saved, and a run that finds a checkpoint of the same configuration continues after it. `stages`: the
    visit's stage sequence; None: the method's own (Method.stages), else the engine's DEFAULT_STAGES.
    """
    stages = stages if stages is not None else getattr(method, "stages", None) or DEFAULT_STAGES
    device = torch.device(device)
    options = options or {}
    report = PruneReport()
    blocks = decoder_blocks(model)
    if pattern.is_nm:
        targets = uniform_targets(model, pattern.sparsity)
    elif isinstance(sparsity, Mapping):
        targets = {name: float(sparsity[name]) for name in layer_names(model)}
    else:
        targets = uniform_targets(model, sparsity)
    start = time.perf_counter()
    needs_data = method.statistic is not None
    if needs_data and input_ids is None:
        raise ValueError(f"{method.name} needs calibration data")

    first, inputs, resumed_notes = 0, None, {}
    if checkpoint is not None:
        checkpoint.fingerprint.update(_fingerprint(method, targets, pattern, options, input_ids, len(blocks), stages))
        if checkpoint.exists():
            first, resumed_hidden, resumed_notes = checkpoint.restore(blocks, needs_data)
    if needs_data and first < len(blocks):
        inputs, offload, batch_size = _inputs(model, input_ids, device, batch_size)
        if first:
            inputs.hidden = [store(h.to(device), offload) for h in resumed_hidden]
        check_finite(inputs.hidden, f"the inputs of block {first}")
        report.timings["capture_s"] = time.perf_counter() - start

    label = pattern if pattern.is_nm else (f"{sparsity:g}" if not isinstance(sparsity, Mapping) else "per layer")
    bar = tqdm(range(len(blocks)), desc=f"{method.name} {label}", unit="block", disable=not progress, leave=False,
               initial=first)
    for index in range(first):  # finished before a resume: only measure them
        for name, layer in prunable_layers(blocks[index]).items():
            key = f"{index}.{name}"
            report.record(key, get_weight(layer), resumed_notes.get(key), targets[key])
    phase = ["moving"]

    def on_phase(name):
        phase[0] = name
        bar.set_postfix_str(name)

    on_disk = block_weights(model)
    for index in range(first, len(blocks)):
        phase[0] = "loading" if on_disk else "moving"
        block = on_disk.load(index) if on_disk else blocks[index]
        try:
            block.to(device)
            layers = prunable_layers(block)
            visit = BlockVisit(index, block, layers, device, method, options, pattern,
                               {name: targets[f"{index}.{name}"] for name in layers}, inputs, report,
                               last=index + 1 == len(blocks), on_phase=on_phase)
            for stage in stages:
                stage(visit)
            del visit
            block.to("cpu")
            if checkpoint is not None:
                last = index + 1 == len(blocks)
                checkpoint.save(index, block, None if last or inputs is None else inputs.hidden, dict(report.layer_info))
            if on_disk:
                on_disk.keep(index)  # the pruned block, written to its shard; read from there from now on
        except torch.cuda.OutOfMemoryError:
            block.to("cpu")
            raise ResourceError(f"CUDA ran out of memory in block {index} ({phase[0]}); lower "
                                f"{spelled('batch_size')} (now {batch_size}), {spelled('calibration.nsamples')} or "
                                f"{spelled('calibration.seqlen')}") from None
        finally:
            if on_disk:
                on_disk.release(index)
            del block
        bar.update(1)
        if on_block_done is not None:
            on_block_done(index)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report.timings["prune_s"] = time.perf_counter() - start
    return report


@torch.no_grad()
def stream_statistics(model: nn.Module, statistic: type, input_ids: torch.Tensor, device="cpu",
                      batch_size: int | None = None, progress: bool = True) -> Iterator[tuple[int, dict, dict]]:
    """A pass over the unchanged model: for each block, yield (index, layers, statistic values by layer name).

    Allocations (OWL) and importance scores read the dense model's activations this way; the model is
    not changed, and each block's outputs feed the next as in the dense model.
    """
    device = torch.device(device)
    reader = Method("statistics", statistic, lambda w, *_a, **_k: None, "read-only pass")
    inputs, _offload, _batch = _inputs(model, input_ids, device, batch_size)
    blocks = decoder_blocks(model)
    for index in tqdm(range(len(blocks)), desc="statistics", unit="block", disable=not progress, leave=False):
        with materialised(model, index) as block:  # a block on disk is read for this visit only
            block.to(device)
            try:
                layers = prunable_layers(block)
                visit = BlockVisit(index, block, layers, device, reader, {}, Pattern(), {}, inputs, PruneReport(),
                                   last=index + 1 == len(blocks))
                gather_statistics(visit)
                values, done = {}, {}
                for name, stat in visit.stats.items():
                    if id(stat) not in done:
                        done[id(stat)] = stat.value()
                    values[name] = done[id(stat)]
                yield index, layers, values
                del visit, values, done
                if index + 1 < len(blocks):
                    calls = inputs.calls[index]
                    inputs.hidden = [store(forward_block(block, h, call, device),
                                           h.device.type == "cpu" and device.type == "cuda")
                                     for h, call in zip(inputs.hidden, calls)]
            finally:
                block.to("cpu")


def _fingerprint(method, targets, pattern, options, input_ids, blocks, stages) -> dict:
    digest = None if input_ids is None else hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest()
    values = sorted(set(targets.values()))
    # One number when uniform (as 0.2.0 checkpoints record it), else a digest of the per-layer targets.
    sparsity = values[0] if len(values) == 1 else hashlib.sha256(repr(sorted(targets.items())).encode()).hexdigest()
    fingerprint = {"method": method.name, "sparsity": sparsity, "pattern": str(pattern), "options": options,
                   "calibration_sha256": digest, "blocks": blocks}
    if tuple(stages) != DEFAULT_STAGES:
        fingerprint["stages"] = [getattr(stage, "__name__", repr(stage)) for stage in stages]
    return fingerprint


def measure_sparsity(model: nn.Module) -> PruneReport:
    """The sparsity of the prunable layers as they are (for dense runs and checks)."""
    report = PruneReport()
    for index, block in enumerate(decoder_blocks(model)):
        for name, layer in prunable_layers(block).items():
            report.record(f"{index}.{name}", get_weight(layer))
    return report
