"""Removing whole routed experts from every mixture-of-experts block (`--pattern experts`).

    check_experts(model, criterion, sparsity)                      # right after loading: refuse early
    prune_experts(model, criterion, sparsity, ids, device, ...)    # score block by block, remove, rewrite

`--sparsity F` is the fraction of routed experts to remove from every MoE block: the count nearest
F x experts (a tie rounds half up, as the budget does for units), the same from every routing group
under group-limited routing (DeepSeek's n_group), refused in one line when the rest could not route
tokens as the family does (fewer than top-k left, or a group too small). Shared experts stay.

Scores come through the engine's streaming pass, one block at a time, on the already pruned upstream
blocks: the block's calibration inputs are forwarded once with its experts running one by one through
their projection layers (models/experts.py, `routed_through_projections`), which shows each expert's
tokens, routing weights and outputs, while a hook on the router reads its logits; the forward stops
after the MoE module. The criterion (criteria.py, `expert_score`) turns the block's RoutingStats into
one score per expert; the lowest-scored go (ties to the lower index), the expert map (models/
expert_map.py) slices the fused tensors and the router, and the block's outputs, computed by the
smaller block, feed the next. Nothing here names a family.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import propagate, prune_model
from ..engine.capture import Caught, forward_block
from ..engine.prune_report import StructuredReport
from ..methods import Method
from ..methods.masks import Pattern, PatternError
from ..models import (
    ExpertProjection,
    ModelError,
    decoder_blocks,
    expert_map,
    parameter_counts,
    prunable_layers,
    remove_experts,
    rewrite_expert_config,
    routed_through_projections,
    update_model_config,
)
from . import scores as S
from .budget import nearest_count
from .criteria import Criterion


@dataclass
class RoutingStats:
    """What one MoE block's routing did on the calibration tokens (sums in float64)."""

    tokens: int  # calibration tokens that reached the block
    counts: torch.Tensor  # int64 [experts]: tokens routed to each expert (it is among their top-k)
    weighted_norms: torch.Tensor  # sum over each expert's tokens of routing weight x ||expert output||_2
    probabilities: torch.Tensor  # sum over all tokens of softmax(router logits)

    @classmethod
    def empty(cls, num_experts: int, device) -> "RoutingStats":
        return cls(0, torch.zeros(num_experts, dtype=torch.long, device=device),
                   torch.zeros(num_experts, dtype=torch.float64, device=device),
                   torch.zeros(num_experts, dtype=torch.float64, device=device))

    def add_logits(self, logits: torch.Tensor) -> None:
        logits = logits.reshape(-1, logits.shape[-1])
        self.tokens += logits.shape[0]
        self.probabilities += torch.softmax(logits.to(torch.float64), dim=-1).sum(dim=0)  # [tokens, experts]: small

    def add_expert(self, expert: int, weight: torch.Tensor, output: torch.Tensor) -> None:
        self.counts[expert] += weight.shape[0]
        norms = S.at_least_fp32(output).norm(dim=-1)
        self.weighted_norms[expert] += (S.at_least_fp32(weight) * norms).sum(dtype=torch.float64)

    def cpu(self) -> "RoutingStats":
        return RoutingStats(self.tokens, self.counts.cpu(), self.weighted_norms.cpu(), self.probabilities.cpu())


@dataclass
class ExpertsReport(StructuredReport):
    """A structured report whose `sparsity` (removed_fraction) is the fraction of routed experts removed, what
    --sparsity asks for; the fraction of decoder-block parameters is structure["removed_fraction"]."""


def check_experts(model: nn.Module, criterion: Criterion, sparsity: float, flag: str = "--sparsity"):
    """Everything that needs the model (a skeleton will do), before any work: it has routed experts, the
    count nearest the target leaves enough to route as the family does. Returns (expert map, experts
    removed per block); PatternError or ModelError in one line otherwise."""
    if criterion.expert_score is None:  # pragma: no cover - criteria.py pairs criteria with patterns
        raise PatternError(f"{criterion.name} cannot score routed experts")
    emap = expert_map(model)
    count = nearest_count(sparsity * emap.num_experts, 1.0, emap.removal_counts())
    reason = emap.refusal(emap.num_experts - count)
    if reason:
        fine = [c for c in emap.removal_counts() if not emap.refusal(emap.num_experts - c)]
        limit = f"; at most {max(fine) / emap.num_experts:g} ({max(fine)} experts)" if max(fine) else ""
        raise PatternError(f"{flag} {sparsity:g} with pattern experts would remove {count} of the {emap.num_experts} "
                           f"routed experts of every MoE block, and {emap.family} cannot route that way: "
                           f"{reason}{limit}")
    return emap, count


def routing_statistics(visit, emap) -> RoutingStats:
    """One forward of the visit's calibration inputs through its MoE block, experts one by one; stops
    after the MoE module (nothing later is read)."""
    block = visit.block
    moe, router, experts = emap.moe(block), emap.router(block), emap.experts(block)
    stats = RoutingStats.empty(experts.num_experts, visit.device)

    def on_router(_module, _args, output):
        stats.add_logits(output[0] if isinstance(output, tuple) else output)  # (logits, weights, indices)

    def on_expert(owner, expert, _token, weight, output):
        if owner is experts:
            stats.add_expert(expert, weight, output)

    def stop(*_args):
        raise Caught

    handles = [router.register_forward_hook(on_router), moe.register_forward_hook(stop)]
    try:
        layers = [layer for layer in visit.layers.values() if isinstance(layer, ExpertProjection)]
        with routed_through_projections(layers, observe=on_expert):
            for hidden, call in zip(visit.inputs.hidden, visit.inputs.calls[visit.index]):
                try:
                    forward_block(block, hidden, call, visit.device)
                except Caught:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return stats.cpu()


def prune_experts(model: nn.Module, criterion: Criterion, sparsity: float, ids: torch.Tensor | None,
                  device="cpu", batch_size: int | None = None, progress: bool = True) -> ExpertsReport:
    """Remove the lowest-scored routed experts of every MoE block in place; the model stays on the CPU
    with a rewritten config."""
    start = time.perf_counter()
    emap, count = check_experts(model, criterion, sparsity)
    before = parameter_counts(model, emap)
    names = [list(prunable_layers(block)) for block in decoder_blocks(model)]
    config_before = model.config.to_dict()
    removed: dict[int, list[int]] = {}
    scores: dict[int, list[float]] = {}
    tokens: dict[int, list[int]] = {}

    def stage(visit) -> None:
        if emap.moe(visit.block) is not None:
            stats = routing_statistics(visit, emap)
            block_scores = criterion.expert_score(stats)
            gone = S.lowest_in_groups(block_scores, count, emap.groups_of())
            remove_experts(visit.block, emap, [e for e in range(emap.num_experts) if e not in gone])
            removed[visit.index], scores[visit.index] = gone, block_scores.tolist()
            tokens[visit.index] = stats.counts.tolist()
        propagate(visit)

    if count:
        if ids is None:
            raise ValueError(f"{criterion.name} needs calibration data")
        method = Method(criterion.name, RoutingStats, _unused, "routed-expert removal (oneshot.structured.experts)")
        prune_model(model, method, 0.0, Pattern(), ids, device=device, batch_size=batch_size, progress=progress,
                    stages=(stage,))
        try:
            update_model_config(model, rewrite_expert_config(model.config, emap, emap.num_experts - count))
        except ModelError as exc:  # pragma: no cover - check_experts only picks counts the config accepts
            raise PatternError(str(exc)) from None

    after = parameter_counts(model, emap)
    report = ExpertsReport()
    for index, block_names in enumerate(names):
        gone = tuple(f"{emap.experts_name}.{e}." for e in removed.get(index, ()))
        for name in block_names:
            report.layer_sparsity[f"{index}.{name}"] = 1.0 if gone and name.startswith(gone) else 0.0
    report.layer_target = dict.fromkeys(report.layer_sparsity, float(sparsity))
    report.removed_fraction = count / emap.num_experts
    report.structure = {
        "pattern": "experts", "criterion": criterion.name,
        "removal": {"experts_per_block": count,
                    "routed_experts_per_block": [emap.num_experts, emap.num_experts - count], "top_k": emap.top_k,
                    "groups": emap.groups, "experts_per_group": count // emap.groups,
                    "moe_blocks": list(emap.moe_blocks)},
        "removed_experts": {str(index): experts for index, experts in removed.items()},
        "expert_scores": {str(index): values for index, values in scores.items()},
        "expert_tokens": {str(index): values for index, values in tokens.items()},
        "params_before": before["params"], "params_after": after["params"],
        "active_params_before": before["active_params"], "active_params_after": after["active_params"],
        "block_params_before": before["block_params"], "block_params_after": after["block_params"],
        "block_active_params_before": before["block_active_params"],
        "block_active_params_after": after["block_active_params"],
        "routed_expert_params_before": before["routed_expert_params"],
        "routed_expert_params_after": after["routed_expert_params"],
        "removed_expert_fraction": report.removed_fraction,
        "removed_fraction": 1 - after["block_params"] / before["block_params"],
        "removed_fraction_of_model": 1 - after["params"] / before["params"],
        "config": ExpertsReport.config_changes(config_before, model.config.to_dict()),
    }
    report.timings["prune_s"] = time.perf_counter() - start
    return report


def _unused(*_args, **_kwargs):  # pragma: no cover - the experts stage never asks the method to prune
    raise AssertionError("the experts stage removes experts itself")
