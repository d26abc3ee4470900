"""Honest sparsity: how much of the model is zero, not only how much of the layers a method pruned.

A run's `sparsity_measured` is taken over the layers it pruned. On a model whose largest weights the
engine cannot prune (fused experts of an unknown layout, say) that figure can read 0.5 while most of the
model is dense. `measure_coverage` counts zeros over every weight inside the decoder blocks and over the
whole model, and names each kind of block weight that no prunable layer holds and that is not a router,
norm or embedding, so a run can say what it left dense.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import block_weight_roles, decoder_blocks, weight_kind
from ..models.lazy import block_weights, materialised


@dataclass
class Coverage:
    block_zeros: int = 0
    block_numel: int = 0  # every >= 2-D parameter inside the decoder blocks (biases excepted)
    prunable_numel: int = 0  # the part of it that prunable layers hold
    model_zeros: int = 0
    model_numel: int = 0  # every parameter of the model, counted once (tied ones too)
    unpruned: dict[str, dict] = field(default_factory=dict)  # kind -> {"tensors", "numel"}: weights left dense

    @property
    def sparsity_block_weights(self) -> float:
        return self.block_zeros / self.block_numel if self.block_numel else 0.0

    @property
    def sparsity_model(self) -> float:
        return self.model_zeros / self.model_numel if self.model_numel else 0.0

    @property
    def prunable_share(self) -> float:
        """The fraction of the block weights that prunable layers hold."""
        return self.prunable_numel / self.block_numel if self.block_numel else 0.0

    def unpruned_lines(self) -> list[str]:
        """One line per kind of block weight that was left unpruned, largest first."""
        lines = []
        for kind, seen in sorted(self.unpruned.items(), key=lambda item: -item[1]["numel"]):
            share = seen["numel"] / self.block_numel
            lines.append(f"{kind}: {seen['tensors']} tensor(s), {share:.1%} of the block weights, left unpruned "
                         "(not a layer oneshot can prune: not a norm, router or embedding either)")
        return lines


def _zeros(tensor: torch.Tensor) -> int:
    return int((tensor == 0).sum())


@torch.no_grad()
def measure_coverage(model: nn.Module) -> Coverage:
    coverage = Coverage()
    counted: set[int] = set()  # id(parameter), so a tensor is counted once
    on_disk = block_weights(model)
    for index, block in enumerate(decoder_blocks(model)):
        # A block on disk was counted when the engine kept it; one never kept is read once here.
        kept = on_disk.zeros.get(index) if on_disk is not None else None
        visit = materialised(model, index) if on_disk is not None and kept is None else contextlib.nullcontext(block)
        with visit as block:
            zeros_of = {id(p): kept[name] if kept is not None else _zeros(p) for name, p in block.named_parameters()}
            for name, (parameter, role) in block_weight_roles(block).items():
                if id(parameter) in counted:
                    continue
                counted.add(id(parameter))
                coverage.block_zeros += zeros_of[id(parameter)]
                coverage.block_numel += parameter.numel()
                if role == "pruned":
                    coverage.prunable_numel += parameter.numel()
                elif role == "other":
                    seen = coverage.unpruned.setdefault(weight_kind(name), {"tensors": 0, "numel": 0})
                    seen["tensors"] += 1
                    seen["numel"] += parameter.numel()
            for parameter in block.parameters():  # each distinct parameter once
                coverage.model_zeros += zeros_of[id(parameter)]
                coverage.model_numel += parameter.numel()
    in_blocks = {id(p) for block in decoder_blocks(model) for p in block.parameters()}
    for parameter in model.parameters():  # the rest, each distinct parameter once (tied embeddings too)
        if id(parameter) not in in_blocks:
            coverage.model_zeros += _zeros(parameter)
            coverage.model_numel += parameter.numel()
    return coverage
