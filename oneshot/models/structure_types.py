"""The structure map's data types: which rows and columns of which layers make one removable unit.

A `StructureMap` describes a model's decoder blocks: its `AttentionMap` and `MlpMap` name the layers,
and its two `Coupling`s (heads, channels) give each unit's rows or columns in every layer they span
(`Member`) and the module attributes that count units (`UnitCountAttribute`). structure.py builds the
map for each family; removal.py removes units along it.

Conventions: layer names are relative to a block (as `prunable_layers(block)` gives them), and axes
follow `get_weight`'s [outputs, inputs], whatever the layer stores (GPT-2's Conv1D stores [in, out]).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapter import ModelError

ROWS, COLS = 0, 1  # axes of get_weight's [outputs, inputs]; biases belong to ROWS


@dataclass(frozen=True, eq=False)
class Member:
    """One layer's share of a coupling: the rows (or columns) that each unit owns in it."""

    layer: str  # e.g. "self_attn.q_proj", relative to the block
    axis: int  # ROWS (outputs; a bias is sliced with them) or COLS (inputs)
    role: str  # "q", "k", "v", "o" for heads; "gate", "up", "down" for channels
    indices: torch.Tensor  # int64 [num_units, width]: indices[u] are unit u's rows or columns, ascending

    def of(self, units) -> torch.Tensor:
        """The indices of `units` along `axis`, flattened, in the order the units are given."""
        return self.indices[torch.as_tensor(units, dtype=torch.long)].reshape(-1)


@dataclass(frozen=True)
class UnitCountAttribute:
    """A module attribute that counts units and must follow them when units are removed.

    `attribute` may be "config.<key>": a value the module reads from its config at forward time
    (Phi-3's attention reads num_attention_heads there); the module then gets a view of the shared
    config with that value overridden, since blocks may keep different numbers of units.
    """

    module: str  # relative to the block
    attribute: str
    per_unit: int


@dataclass(frozen=True, eq=False)
class Coupling:
    """Groups of rows and columns, across layers of one block, that can only be removed together."""

    kind: str  # "heads" or "channels"
    num_units: int
    members: tuple[Member, ...]
    counters: tuple[UnitCountAttribute, ...]
    per_unit: tuple[tuple[str, int], ...]  # rewrite_config keyword -> amount per unit, e.g. ("num_heads", 2)
    allowed_counts: Sequence[int]  # numbers of kept units the family's config can express
    removable: bool
    reason: str = ""  # when not removable: why, in one line

    def layers(self) -> dict[tuple[str, int], tuple[Member, ...]]:
        """Members grouped by (layer, axis): a fused layer holds several members on one axis."""
        grouped: dict[tuple[str, int], list[Member]] = {}
        for member in self.members:
            grouped.setdefault((member.layer, member.axis), []).append(member)
        return {key: tuple(members) for key, members in grouped.items()}

    def index(self, layer: str, axis: int, units) -> torch.Tensor:
        """The ascending indices that `units` own along one axis of one layer (all its members)."""
        parts = [m.of(units) for m in self.members if m.layer == layer and m.axis == axis]
        if not parts:
            raise KeyError(f"{layer} (axis {axis}) is not a member of the {self.kind} coupling")
        return torch.sort(torch.cat(parts)).values

    def config_kwargs(self, num_kept: int) -> dict[str, int]:
        """rewrite_config's keyword arguments for a model that keeps `num_kept` units in every block."""
        return {key: amount * num_kept for key, amount in self.per_unit}


@dataclass(frozen=True)
class AttentionMap:
    module: str  # the attention module, e.g. "self_attn"
    o: str  # output projection (its input columns are the heads)
    q: str | None  # separate projections; None when fused
    k: str | None
    v: str | None
    qkv: str | None  # fused projection; None when separate
    qkv_layout: str  # "separate", "q|k|v" (blocks one after another) or "per-head q,k,v" (interleaved)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    head_norms: tuple[str, ...]  # norms over head_dim shared by all heads (Qwen3, Gemma 3): never sliced
    # (config key, layer-name prefix): the switch that gives `o` a bias (and every layer under the
    # prefix with it), where the family has one; None when `o` has a bias already or cannot get one.
    bias_switch: tuple[str, str] | None = None


@dataclass(frozen=True)
class MlpMap:
    module: str  # "" when the MLP layers sit directly in the block (OPT)
    up: str | None  # input projection (fc1, c_fc, dense_h_to_4h); None when fused with gate
    gate: str | None  # gated MLPs only
    gate_up: str | None  # Phi-3's fused [gate | up] rows
    down: str | None  # output projection (its input columns are the channels); None for a mixture of experts
    intermediate_size: int
    up_bias: bool
    down_bias: bool
    bias_switch: tuple[str, str] | None = None  # as AttentionMap.bias_switch, for `down`


@dataclass(frozen=True, eq=False)
class StructureMap:
    family: str
    num_blocks: int
    hidden_size: int
    attention: AttentionMap
    mlp: MlpMap
    norms: tuple[str, ...]  # hidden-size norms of the block: untouched by head and channel removal
    heads: Coupling
    channels: Coupling
    trailing_blocks_only: bool = False  # a block's maths depends on its index: only trailing blocks can go
    blocks_reason: str = ""

    def coupling(self, kind: str) -> Coupling:
        if kind not in ("heads", "channels"):
            raise ModelError(f"unknown unit kind {kind!r}; choose heads or channels")
        return getattr(self, kind)
