"""What a pruning pass measured: per-layer target and measured sparsity, method notes, timings."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruneReport:
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # "block.layer" -> zeros / numel
    layer_target: dict[str, float] = field(default_factory=dict)  # "block.layer" -> the sparsity asked for
    layer_info: dict[str, dict] = field(default_factory=dict)  # what a method noted per layer (damping, ...)
    zeros: int = 0
    numel: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)  # "block.layer" -> grid parameters, for export

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def record(self, name: str, weight: torch.Tensor, info: dict | None = None, target: float | None = None,
               quantized=None) -> None:
        zeros = int((weight == 0).sum())
        self.zeros += zeros
        self.numel += weight.numel()
        self.layer_sparsity[name] = zeros / weight.numel()
        if target is not None:
            self.layer_target[name] = target
        if info:
            self.layer_info[name] = info
        if quantized is not None:
            self.quantized[name] = quantized


@dataclass
class StructuredReport(PruneReport):
    """A structured run's report (oneshot/structured): its `sparsity` is the removed fraction of decoder-block
    parameters, and `structure` says what went."""

    removed_fraction: float = 0.0
    structure: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.removed_fraction

    @staticmethod
    def config_changes(before: dict, after: dict) -> dict:
        """The config keys a removal changed, as {key: [before, after]} (structure["config"])."""
        return {key: [before.get(key), value] for key, value in after.items()
                if before.get(key) != value and not key.startswith("_")}
