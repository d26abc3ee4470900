"""The expert map: where each mixture-of-experts family keeps its routed experts and its router, the config
keys that count them, and the routing rules a smaller expert count must still satisfy; and removal of
whole routed experts along it, so that the result is a standard checkpoint that plain transformers loads.

The structure map (structure.py) knows heads, channels and blocks; this is its counterpart for routed
experts, and the table `_FAMILIES` at the bottom is the only place here that names families. Removing
experts slices the fused expert tensors (`gate_up_proj` or `up_proj`, `down_proj` and their biases) along
the expert axis, drops the router's rows for the removed experts (its weight, its bias, and per-expert
buffers such as DeepSeek-V3's `e_score_correction_bias`), updates the modules' own `num_experts`, and
rewrites the config's expert count in the family's own key. Shared experts (Qwen2-MoE's `shared_expert`,
DeepSeek's `shared_experts`) are ordinary MLPs that every token reaches: they are never removed here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .adapter import ModelError, decoder_blocks
from .experts import is_fused_experts

# The fused tensors of transformers' experts contract, one slice per expert along dimension 0.
_EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


@dataclass(frozen=True)
class ExpertMap:
    """A mixture-of-experts model's routed experts: how many, how tokens are routed to them, and where."""

    family: str
    num_experts: int  # routed experts per MoE block
    top_k: int  # experts each token is routed to
    groups: int  # routing groups (DeepSeek's n_group under group-limited routing); 1 without
    topk_group: int  # groups each token may choose from (== groups without group-limited routing)
    group_min: int  # experts each group must keep for the router's group score to be defined
    moe_blocks: tuple[int, ...]  # indices of the decoder blocks that have routed experts
    count_key: str  # the config key that counts routed experts
    top_k_key: str
    _family: "_Family"

    def moe(self, block: nn.Module) -> nn.Module | None:
        """The block's mixture-of-experts module, or None for a dense block."""
        return _moe_of(block, self._family)

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(self.moe(block), self._family.router)

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(self.moe(block), self._family.experts)

    @property
    def experts_name(self) -> str:
        """The fused experts' qualified name inside a block (prunable_layers names an expert's layers
        '{experts_name}.{expert}.{projection}')."""
        return f"{self._family.moe}.{self._family.experts}"

    def removal_counts(self) -> list[int]:
        """Numbers of experts per block that can be removed so that every group loses as many (0 included)."""
        return list(range(0, self.num_experts + 1, self.groups))

    def refusal(self, kept: int) -> str:
        """Why a model keeping `kept` routed experts per block could not route as this family does
        (one phrase), or "" when it can."""
        if kept < 1:
            return "every routed expert would go"
        if kept < self.top_k:
            return (f"{kept} would be fewer than the {self.top_k} experts each token is routed to "
                    f"({self.top_k_key}, which stays as it is)")
        if self.groups > 1:
            per_group = kept // self.groups
            if per_group < self._family.group_min:
                return (f"its {self.groups} routing groups (n_group) would keep {per_group} expert(s) each, and "
                        f"{self._family.group_reason}")
            if per_group * self.topk_group < self.top_k:
                return (f"the {self.topk_group} group(s) a token may choose (topk_group) would hold "
                        f"{per_group * self.topk_group} experts, fewer than the {self.top_k} it is routed to")
        return ""

    def groups_of(self) -> list[list[int]]:
        """The experts of each routing group, in order (one group without group-limited routing)."""
        size = self.num_experts // self.groups
        return [list(range(g * size, (g + 1) * size)) for g in range(self.groups)]


def expert_map(model: nn.Module) -> ExpertMap:
    """The routed experts of `model` (a skeleton on the meta device will do); ModelError in one line for a
    model that has none, or whose experts are stored in a way this map does not know."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in _FAMILIES:
        raise ModelError(f"model family {family!r} has no routed experts to remove (mixture-of-experts families: "
                         f"{', '.join(_FAMILIES)})")
    spec = _FAMILIES[family]
    count = getattr(config, spec.count_key)
    top_k = getattr(config, spec.top_k_key)
    groups = spec.groups(config) or 1
    topk_group = (getattr(config, spec.topk_group_key, None) or groups) if groups > 1 else 1
    moe_blocks = []
    for index, block in enumerate(decoder_blocks(model)):
        moe = _moe_of(block, spec)
        if moe is None:
            continue
        experts, router = getattr(moe, spec.experts), getattr(moe, spec.router, None)
        if experts.num_experts != count or router is None or router.weight.shape[0] != count:
            raise ModelError(f"{family} block {index}: its experts or router do not hold the {count} experts the "
                             f"config's {spec.count_key} says (experts removed without rewriting the config?)")
        moe_blocks.append(index)
    if not moe_blocks:
        raise ModelError(f"this {family} model has no block with routed experts in fused tensors")
    if count % groups:
        raise ModelError(f"{family}: {count} routed experts do not split into {groups} routing groups")
    return ExpertMap(family, count, top_k, groups, topk_group, spec.group_min, tuple(moe_blocks), spec.count_key,
                     spec.top_k_key, spec)


def _moe_of(block: nn.Module, spec: "_Family") -> nn.Module | None:
    moe = getattr(block, spec.moe, None)
    experts = getattr(moe, spec.experts, None) if moe is not None else None
    return moe if isinstance(experts, nn.Module) and is_fused_experts(experts) else None


@torch.no_grad()
def remove_experts(block: nn.Module, emap: ExpertMap, keep) -> None:
    """Keep only the routed experts `keep` (indices; order and repeats do not matter) of one MoE block, in
    place: the fused expert tensors and the router's rows are sliced along the expert axis (one
    index_select per tensor), and the modules' `num_experts` follow. The config is not touched: call
    `update_model_config(model, rewrite_expert_config(...))` once every block agrees."""
    moe = emap.moe(block)
    if moe is None:
        raise ModelError("this block has no routed experts")
    experts, router = emap.experts(block), emap.router(block)
    total = experts.num_experts
    kept = torch.unique(torch.as_tensor(list(keep), dtype=torch.long))
    if kept.numel() == 0 or kept[0] < 0 or kept[-1] >= total:
        raise ModelError(f"experts to keep must be some of 0..{total - 1}, got {kept.tolist()}")
    for owner, names in ((experts, _EXPERT_TENSORS), (router, ("weight", "bias") + emap._family.router_buffers)):
        for name in names:
            tensor = getattr(owner, name, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            if tensor.shape[0] != total:
                raise ModelError(f"{type(owner).__name__}.{name} has {tensor.shape[0]} rows, not {total} experts")
            sliced = tensor.data.index_select(0, kept.to(tensor.device))
            if isinstance(tensor, nn.Parameter):
                setattr(owner, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
            else:  # a buffer
                setattr(owner, name, sliced)
    for module in (moe, experts, router):
        if isinstance(getattr(module, "num_experts", None), int):
            module.num_experts = int(kept.numel())
    if isinstance(router, nn.Linear):
        router.out_features = int(kept.numel())


def rewrite_expert_config(config, emap: ExpertMap, num_experts: int):
    """A new config with `num_experts` routed experts per MoE block, in the family's own key (checked by
    the config class's own validation); `config` is left as it is."""
    reason = emap.refusal(num_experts)
    if reason:
        raise ModelError(f"{emap.family} cannot keep {num_experts} routed experts per block: {reason}")
    new = copy.deepcopy(config)
    setattr(new, emap.count_key, num_experts)
    if getattr(new, emap.count_key) != num_experts:  # pragma: no cover - an attribute map gone wrong
        raise ModelError(f"{emap.family}: setting {emap.count_key} did not change the expert count")
    try:
        new.validate()
    except Exception as exc:  # the config class's own checks; their errors span several lines
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelError(f"{emap.family} config refuses {num_experts} experts: "
                         f"{lines[-1] if lines else type(exc).__name__}") from None
    return new


def parameter_counts(model: nn.Module, emap: ExpertMap) -> dict[str, int]:
    """Parameters of the whole model and of its decoder blocks (tied parameters once), total and active
    per token. Active per token: every parameter outside the routed experts (embeddings, attention,
    norms, routers, shared experts, dense MLPs, the LM head), plus, in every MoE block, the top-k routed
    experts a token reaches."""
    blocks = decoder_blocks(model)
    routed = unused = 0
    for index in emap.moe_blocks:
        experts = emap.experts(blocks[index])
        fused = sum(t.numel() for name in _EXPERT_TENSORS
                    if isinstance(t := getattr(experts, name, None), torch.Tensor))
        routed += fused
        unused += fused - fused // experts.num_experts * min(emap.top_k, experts.num_experts)
    total = sum(p.numel() for p in model.parameters())
    block_total = sum(p.numel() for p in blocks.parameters())
    return {"params": total, "active_params": total - unused, "block_params": block_total,
            "block_active_params": block_total - unused, "routed_expert_params": routed}


# ---------------------------------------------------------------------------------------------------
# The family table


@dataclass(frozen=True)
class _Family:
    count_key: str  # config key: routed experts per MoE block
    moe: str = "mlp"  # the block's mixture-of-experts module (dense blocks have an MLP there instead)
    router: str = "gate"  # inside the MoE module: one row per routed expert
    experts: str = "experts"  # inside the MoE module: the fused routed experts
    router_buffers: tuple[str, ...] = ()  # per-expert router tensors beside its weight and bias
    top_k_key: str = "num_experts_per_tok"
    groups: Callable = lambda config: 1  # routing groups under group-limited routing
    topk_group_key: str | None = None
    group_min: int = 1  # experts a group must keep
    group_reason: str = ""  # why group_min


def _deepseek_v2_groups(config) -> int:
    # DeepSeek-V2 limits tokens to topk_group of n_group groups only under topk_method group_limited_greedy.
    return (config.n_group or 1) if getattr(config, "topk_method", None) == "group_limited_greedy" else 1


_FAMILIES: dict[str, _Family] = {
    "mixtral": _Family("num_local_experts"),
    "qwen2_moe": _Family("num_experts"),
    # transformers 5 stores Qwen3-MoE's count as num_local_experts; num_experts (its older key) maps to it.
    "qwen3_moe": _Family("num_experts"),
    "olmoe": _Family("num_experts"),
    "deepseek_v2": _Family("n_routed_experts", groups=_deepseek_v2_groups, topk_group_key="topk_group",
                           group_reason="group-limited routing needs an expert in every group"),
    # DeepSeek-V3 routes by sigmoid scores plus a per-expert correction bias (a router buffer), and scores
    # each group by the sum of its two highest expert scores.
    "deepseek_v3": _Family("n_routed_experts", router_buffers=("e_score_correction_bias",),
                           groups=lambda config: config.n_group or 1, topk_group_key="topk_group", group_min=2,
                           group_reason="DeepSeek-V3 scores each group by the sum of its two highest expert scores, "
                                        "so every group must keep at least 2"),
}
