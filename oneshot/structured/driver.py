"""Structured pruning of a loaded model: what the run API calls when the pattern is structured.

    check_structured(model, criterion, pattern, sparsity, options)   # right after loading: refuse early
    prune_structured(model, criterion, pattern, sparsity, ids, ...)  # score, remove, compensate, refit

Units inside blocks (heads, channels, width) go through the engine's streaming pass, one block at a
time: gather the consuming projections' input statistics, score the units, remove the lowest-scored
ones from every member layer (the structure map's `remove_units`), then compensate the bias (a
criterion that declares `compensates_bias`: flap) or refit by least squares (`reconstruct`), and hand
the block's outputs to the next block. Wanda-sp and the others see the already-pruned upstream blocks,
as Wanda's and FLAP's Wanda-sp code do; a criterion that declares `dense_statistics` (FLAP) sees the
dense model's activations, as the authors' code does. Gradient criteria read one backward pass of the
dense model first. Whole blocks (layers) are scored on the dense model and removed at once. Nothing
here names a model family or a criterion: the structure map says what belongs to what, and each
Criterion (criteria.py) how it scores and what it puts back.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..engine import gather_statistics, propagate, prune_model
from ..engine.prune_report import StructuredReport
from ..methods import Method
from ..methods.masks import Pattern, PatternError
from ..models import (
    COLS,
    ROWS,
    ModelError,
    decoder_blocks,
    get_weight,
    prunable_layers,
    remove_blocks,
    remove_units,
    rewrite_config,
    set_weight,
    structure_map,
    update_model_config,
)
from . import scores as S
from .budget import Removal, Sizes, plan_removal
from .criteria import ACTIVATIONS, CRITERIA, GRADIENTS, HIDDEN, WEIGHTS, Criterion
from .moments import channel_stats
from .passes import first_order, hidden_states
from .refit import compensation, least_squares


def _consumer(coupling):
    return next(m for m in coupling.members if m.axis == COLS)


def _unit_params(block: nn.Module, coupling) -> int:
    """Parameters one unit owns: its rows (with their biases) and columns in every member layer."""
    modules = dict(block.named_modules())
    total = 0
    for member in coupling.members:
        layer = modules[member.layer]
        width, other = member.indices.shape[1], get_weight(layer).shape[1 - member.axis]
        total += width * other + (width if member.axis == ROWS and layer.bias is not None else 0)
    return total


def model_sizes(model: nn.Module, smap) -> Sizes:
    block = decoder_blocks(model)[0]
    heads = smap.heads
    return Sizes(num_blocks=smap.num_blocks, block=sum(p.numel() for p in block.parameters()),
                 num_heads=heads.num_units, head=_unit_params(block, heads),
                 head_counts=tuple(heads.allowed_counts) if heads.removable else (heads.num_units,),
                 num_channels=smap.channels.num_units, channel=_unit_params(block, smap.channels))


def check_structured(model: nn.Module, criterion: Criterion, pattern: Pattern, sparsity: float, options: dict,
                     flag: str = "--sparsity"):
    """Everything that needs the model, before any work: the family can take the pattern, the target
    leaves something of every kind, flap's bias has somewhere to go. Returns (structure map, Removal);
    PatternError or ModelError in one line otherwise."""
    if pattern.structure == "experts":  # whole routed experts: the expert map, not the structure map
        from .experts import check_experts

        return check_experts(model, criterion, sparsity, flag)
    smap = structure_map(model)
    structure = pattern.structure
    if structure in ("heads", "width") and not smap.heads.removable:
        other = " (pattern channels can still shrink its MLP)" if structure == "width" and smap.channels.removable \
            else ""
        raise PatternError(f"pattern {structure} removes attention heads and cannot apply: {smap.heads.reason}{other}")
    if structure in ("channels", "width") and not smap.channels.removable:
        raise PatternError(f"pattern {structure} removes MLP channels and cannot apply: {smap.family}: "
                           f"{smap.channels.reason}")
    if structure == "layers" and smap.trailing_blocks_only:
        raise PatternError(f"pattern layers: {smap.blocks_reason}, not the blocks a criterion chooses")
    removal = plan_removal(structure, sparsity, model_sizes(model, smap), flag,
                           channel_multiple=options.get("channel_multiple", 1))
    if criterion.bias_compensation(options):
        for kind, count in (("heads", removal.heads), ("channels", removal.channels)):
            part = smap.attention if kind == "heads" else smap.mlp
            has_bias = part.o_bias if kind == "heads" else part.down_bias
            if count and not has_bias and part.bias_switch is None:
                raise PatternError(f"{criterion.name}'s bias compensation needs a bias on "
                                   f"{_consumer(smap.coupling(kind)).layer}, which {smap.family}'s config cannot "
                                   "give it; pass --option bias_compensation=false to remove by the fluctuation "
                                   "score alone")
    return smap, removal


def prune_structured(model: nn.Module, criterion: Criterion, pattern: Pattern, sparsity: float,
                     ids: torch.Tensor | None = None, device="cpu", batch_size: int | None = None,
                     options: dict | None = None, progress: bool = True) -> StructuredReport:
    """Remove units (or blocks) of `model` in place; the model stays on the CPU with a rewritten config."""
    options = options or {}
    if pattern.structure == "experts":
        from .experts import prune_experts

        return prune_experts(model, criterion, sparsity, ids, device, batch_size, progress)
    start = time.perf_counter()
    smap, removal = check_structured(model, criterion, pattern, sparsity, options)
    if ids is None and criterion.reads_calibration(options):
        raise ValueError(f"{criterion.name} needs calibration data")
    before_layers = _layer_numels(model)
    before_params, before_blocks = _count(model), _count(decoder_blocks(model))
    config_before = model.config.to_dict()
    structure: dict = {"pattern": pattern.structure, "criterion": criterion.name}
    if pattern.structure == "layers":
        kept = _remove_layers(model, smap, criterion, removal, ids, device, batch_size, progress, structure)
    else:
        kept = list(range(smap.num_blocks))
        _remove_units(model, smap, criterion, removal, ids, device, batch_size, options, progress, structure)

    after_layers = _layer_numels(model)
    report = StructuredReport()
    for position, index in enumerate(kept):
        for name, numel in before_layers[index].items():
            report.layer_sparsity[f"{index}.{name}"] = 1 - after_layers[position][name] / numel
    for index in set(range(smap.num_blocks)) - set(kept):
        for name in before_layers[index]:
            report.layer_sparsity[f"{index}.{name}"] = 1.0
    report.layer_sparsity = dict(sorted(report.layer_sparsity.items(), key=lambda kv: (int(kv[0].split(".")[0]),)))
    report.layer_target = dict.fromkeys(report.layer_sparsity, float(sparsity))
    after_params, after_blocks = _count(model), _count(decoder_blocks(model))
    report.removed_fraction = 1 - after_blocks / before_blocks
    structure.update(
        removal={"blocks": removal.blocks, "kv_groups_per_block": removal.heads,
                 "heads_per_block": removal.heads * (smap.attention.num_heads // smap.attention.num_kv_heads),
                 "channels_per_block": removal.channels},
        params_before=before_params, params_after=after_params, block_params_before=before_blocks,
        block_params_after=after_blocks, removed_fraction=report.removed_fraction,
        removed_fraction_of_model=1 - after_params / before_params,
        config=StructuredReport.config_changes(config_before, model.config.to_dict()))
    report.structure = structure
    report.timings["prune_s"] = time.perf_counter() - start
    return report


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters once


def _layer_numels(model: nn.Module) -> list[dict[str, int]]:
    # An expert's projection owns no parameters of its own (a view of the fused tensor): count its weight.
    return [{name: sum(p.numel() for p in layer.parameters()) or get_weight(layer).numel()
             for name, layer in prunable_layers(block).items()} for block in decoder_blocks(model)]


# ---- whole blocks ----------------------------------------------------------------------------------

def _remove_layers(model, smap, criterion: Criterion, removal: Removal, ids, device, batch_size, progress,
                   structure: dict) -> list[int]:
    count = removal.blocks
    blocks = decoder_blocks(model)
    if criterion.choose_blocks is None or criterion.reads not in (WEIGHTS, GRADIENTS, HIDDEN):  # pragma: no cover
        raise PatternError(f"{criterion.name} cannot score blocks")  # criteria.py pairs criteria with patterns
    if criterion.reads == HIDDEN:
        read = hidden_states(model, ids, device, batch_size, progress)
    elif criterion.reads == GRADIENTS:
        read = first_order(model, smap, ["blocks"], ids, criterion.name, device, batch_size, progress)
    else:  # WEIGHTS
        read = [[get_weight(layer) for layer in prunable_layers(block).values()] for block in blocks]
    removed, scores = criterion.choose_blocks(read, count)
    kept = [i for i in range(len(blocks)) if i not in removed]
    if removed:
        remove_blocks(model, kept)
    structure.update(removed_blocks=removed, block_scores=scores)
    return kept


# ---- units inside every block --------------------------------------------------------------------

def enable_bias(model: nn.Module, smap, kind: str) -> None:
    """Give the consuming projection of `kind` (and the layers its config switch governs) a zero bias in
    every block, and turn the switch on, so that a saved model loads with the bias (FLAP)."""
    key, prefix = (smap.attention if kind == "heads" else smap.mlp).bias_switch
    setattr(model.config, key, True)
    for block in decoder_blocks(model):
        for name, layer in prunable_layers(block).items():
            if name.startswith(prefix) and layer.bias is None:
                weight = layer.weight
                layer.bias = nn.Parameter(torch.zeros(get_weight(layer).shape[0], dtype=weight.dtype,
                                                      device=weight.device), requires_grad=weight.requires_grad)


def unit_scores(criterion: Criterion | str, coupling, layer: nn.Module, moments=None,
                precomputed=None) -> torch.Tensor:
    """Scores of `coupling`'s units in one block; `layer` is its consuming projection. `criterion` is a
    Criterion or its name in CRITERIA."""
    criterion = CRITERIA[criterion] if isinstance(criterion, str) else criterion
    if criterion.unit_score is None:
        return precomputed  # taylor, gradient: from the backward pass
    return criterion.unit_score(get_weight(layer), moments, _consumer(coupling).indices)


def _remove_units(model, smap, criterion: Criterion, removal: Removal, ids, device, batch_size, options, progress,
                  structure: dict) -> None:
    plan = [(coupling, count) for coupling, count in ((smap.heads, removal.heads), (smap.channels, removal.channels))
            if count]
    if not plan:
        return
    reconstruct = bool(options.get("reconstruct", False))
    fit_bias_everywhere = criterion.bias_compensation(options)
    compensate = fit_bias_everywhere and not reconstruct
    precomputed = None
    if criterion.reads == GRADIENTS:
        precomputed = first_order(model, smap, [c.kind for c, _ in plan], ids, criterion.name, device, batch_size,
                                  progress)
    if fit_bias_everywhere:
        for coupling, _ in plan:
            part = smap.attention if coupling.kind == "heads" else smap.mlp
            if part.bias_switch is not None:
                enable_bias(model, smap, coupling.kind)
    needs_stream = criterion.reads == ACTIVATIONS or reconstruct
    dense_stream = criterion.dense_statistics
    removed_heads: dict[int, list[int]] = {}

    def stage(visit) -> None:
        moments = {}
        if needs_stream:
            names = [_consumer(coupling).layer for coupling, _ in plan]
            gather_statistics(visit, names)
            moments = {name: visit.stats.pop(name).value() for name in names}
            if dense_stream:
                propagate(visit)
        for coupling, count in plan:
            member = _consumer(coupling)
            layer = visit.layers[member.layer]
            scores = unit_scores(criterion, coupling, layer, moments.get(member.layer),
                                 None if precomputed is None else precomputed[visit.index][coupling.kind])
            removed = S.lowest(scores, count)
            kept = [u for u in range(coupling.num_units) if u not in removed]
            weight = get_weight(layer).clone()
            bias = None if layer.bias is None else layer.bias.data.clone()
            remove_units(visit.block, coupling, kept)
            if reconstruct:
                stats = moments[member.layer]
                new_weight, new_bias = least_squares(weight, bias, stats.gram, stats.total, stats.count,
                                                     coupling.index(member.layer, COLS, kept),
                                                     fit_bias=layer.bias is not None)
                set_weight(layer, new_weight)
                if new_bias is not None:
                    layer.bias.data.copy_(new_bias)
            elif compensate:
                gained = compensation(weight, moments[member.layer].mean, coupling.index(member.layer, COLS, removed))
                layer.bias.data += gained.to(layer.bias.dtype)
            if coupling.kind == "heads":
                removed_heads[visit.index] = removed
        if needs_stream and not dense_stream:
            propagate(visit)

    method = Method(f"{criterion.name}", channel_stats(reconstruct) if needs_stream else None,
                    _unused, "structured removal (oneshot.structured)")
    prune_model(model, method, 0.0, Pattern(), ids if needs_stream else None, device=device, batch_size=batch_size,
                progress=progress, stages=(stage,))
    kwargs = {}
    for coupling, count in plan:
        kwargs.update(coupling.config_kwargs(coupling.num_units - count))
    try:
        update_model_config(model, rewrite_config(model.config, **kwargs))
    except ModelError as exc:  # pragma: no cover - plan_removal only picks counts the config accepts
        raise PatternError(str(exc)) from None
    if removed_heads:
        structure["removed_kv_groups"] = {str(index): units for index, units in removed_heads.items()}


def _unused(*_args, **_kwargs):  # pragma: no cover - the structured stage never asks the method to prune
    raise AssertionError("structured stages remove units themselves")
