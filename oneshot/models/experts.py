"""Mixture-of-experts blocks: fused expert tensors as one layer per expert and projection, and which
modules are routers.

transformers 5 keeps a MoE block's experts in 3-D parameters (`gate_up_proj` [experts, 2 x intermediate,
hidden] and `down_proj` [experts, hidden, intermediate], or the transpose) and runs them in one fused
kernel, so no `nn.Linear` exists for the engine to hook or prune. Here each expert's gate, up and down
projections become `ExpertProjection`s: modules with no parameters of their own that read and write
their rows of the fused tensor, as Mixtral's w1, w3 and w2 were separate layers before the fusion (and
as a dense MLP's are). While `routed_through_projections` is active, the experts run one expert at a
time through these modules, each on exactly the tokens the router sends to it, so the engine's ordinary
input hooks give every expert its own statistic (gate and up read one tensor, so they share one).
Outside that context the model runs its own fused forward.

One reading covers every family built on transformers' experts contract (`use_experts_implementation`:
the flags has_gate, has_bias, is_transposed, is_concatenated, has_post_expert_norm and the `_apply_gate`
rule); experts stored any other way are not prunable here, and the run reports them as unpruned weights.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F


class ExpertProjection(nn.Module):
    """One expert's projection inside a fused experts module: a layer whose weight is a slice of it."""

    def __init__(self, experts: nn.Module, role: str, parameter: str, index: int, rows: slice = slice(None)):
        super().__init__()
        # Plain attribute, not a submodule: the view owns no parameters, so the model's state dict,
        # .to() and save_pretrained never see it.
        object.__setattr__(self, "experts", experts)
        self.role, self.parameter, self.index, self.rows = role, parameter, index, rows  # role: e.g. "gate_proj"

    @property
    def fused(self) -> nn.Parameter:
        """The 3-D parameter this projection is a slice of (read at call time: the block may move)."""
        return getattr(self.experts, self.parameter)

    def _matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """This expert's [outputs, inputs] rows of `tensor` (the fused parameter or its data), a view."""
        w = tensor[self.index]
        return (w.t() if self.experts.is_transposed else w)[self.rows]

    def weight(self) -> torch.Tensor:
        return self._matrix(self.fused.data)

    def write(self, weight: torch.Tensor) -> None:
        self._matrix(self.fused.data).copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.experts, f"{self.parameter}_bias")[self.index][self.rows] if self.experts.has_bias else None
        return F.linear(x, self._matrix(self.fused), bias)

    def extra_repr(self) -> str:
        return f"{self.role} of expert {self.index}: {self.parameter}[{self.index}], {tuple(self.weight().shape)}"


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` holds experts in 3-D tensors under transformers' experts contract."""
    if not all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    tensors = [getattr(module, name, None) for name in (first, "down_proj")]
    return all(isinstance(t, nn.Parameter) and t.dim() == 3 and t.shape[0] == module.num_experts for t in tensors)


def _projections(experts: nn.Module, index: int) -> list[ExpertProjection]:
    """Expert `index`'s layers in the order they run: gate_proj, up_proj (or up_proj alone), down_proj."""
    if experts.has_gate:
        # gate_up_proj stacks [gate; up] (concatenated) or alternates gate and up rows (gpt-oss).
        width = experts.gate_up_proj.shape[2 if experts.is_transposed else 1] // 2
        if getattr(experts, "is_concatenated", True):
            gate, up = slice(0, width), slice(width, 2 * width)
        else:
            gate, up = slice(0, None, 2), slice(1, None, 2)
        first = [ExpertProjection(experts, "gate_proj", "gate_up_proj", index, gate),
                 ExpertProjection(experts, "up_proj", "gate_up_proj", index, up)]
    else:
        first = [ExpertProjection(experts, "up_proj", "up_proj", index)]
    return first + [ExpertProjection(experts, "down_proj", "down_proj", index)]


def expert_projections(experts: nn.Module) -> dict[str, ExpertProjection]:
    """'{expert}.{projection}' -> its layer, expert by expert."""
    return {f"{e}.{layer.role}": layer for e in range(experts.num_experts) for layer in _projections(experts, e)}


def _expert_forward(experts: nn.Module, layers: list[ExpertProjection], x: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens, through its projection layers; the same maths as the fused kernel."""
    *first, down = layers
    if experts.has_gate:
        gate, up = (layer(x) for layer in first)  # one input tensor: the engine gives them one statistic
        if getattr(experts, "is_concatenated", True):
            h = torch.cat([gate, up], dim=-1)
        else:
            h = torch.stack([gate, up], dim=-1).flatten(-2)
        h = experts._apply_gate(h)
    else:
        h = experts.act_fn(first[0](x))
    h = down(h)
    return experts.post_expert_norm(h) if getattr(experts, "has_post_expert_norm", False) else h


def _routed_forward(experts: nn.Module, per_expert: list[list[ExpertProjection]], hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, observe=None) -> torch.Tensor:
    """The experts' computation, one expert at a time through its projection layers.

    Every expert is called, even with no tokens, so that its statistic counts every calibration chunk
    (N is the number of calibration sequences for every layer, as for dense layers). `observe`, when
    given, is called for every expert as observe(experts, expert, token, weight, output): the indices of
    the tokens routed to it, the routing weight the block gives each of them, and the expert's output
    for each, before that weight is applied.
    """
    out = torch.zeros_like(hidden_states)
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
    counts = torch.bincount(flat, minlength=len(per_expert))[: len(per_expert)].tolist()  # one host sync
    start = 0
    for expert, (layers, count) in enumerate(zip(per_expert, counts)):
        chosen, start = order[start:start + count], start + count
        token, slot = chosen // k, chosen % k
        h = _expert_forward(experts, layers, hidden_states[token])
        if observe is not None:
            observe(experts, expert, token, top_k_weights[token, slot], h)
        out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
    return out


@contextlib.contextmanager
def routed_through_projections(layers: Iterable[nn.Module], observe=None) -> Iterator[None]:
    """While active, every fused experts module that one of `layers` belongs to runs expert by expert
    through its ExpertProjection layers (the given ones, so hooks on them see each expert's tokens);
    `observe` sees each expert's tokens, routing weights and outputs (see _routed_forward)."""
    given: dict[int, dict[tuple[int, str], ExpertProjection]] = {}
    owners: dict[int, nn.Module] = {}
    for layer in layers:
        if isinstance(layer, ExpertProjection):
            owners[id(layer.experts)] = layer.experts
            given.setdefault(id(layer.experts), {})[(layer.index, layer.role)] = layer
    patched = []
    try:
        for owner, experts in owners.items():
            # Layers not asked for (no hooks on them) are made fresh.
            per_expert = [[given[owner].get((e, fresh.role), fresh) for fresh in _projections(experts, e)]
                          for e in range(experts.num_experts)]
            previous = experts.__dict__.get("forward")
            experts.forward = functools.partial(_routed_forward, experts, per_expert, observe=observe)
            patched.append((experts, previous))
        yield
    finally:
        for experts, previous in patched:
            del experts.forward
            if previous is not None:
                experts.forward = previous


def _expert_count(module: nn.Module) -> int | None:
    experts = getattr(module, "experts", None)
    if experts is None or not isinstance(experts, nn.Module):
        return None
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    return getattr(experts, "num_experts", None)


def _is_router_class(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "router" in name or "gating" in name or name.endswith("gate")


def routers(block: nn.Module) -> set[int]:
    """ids of the modules in `block` that route tokens, which are never pruned: a router module and
    everything inside it (by class: *Router, *Gating, *Gate), a linear layer with a single output
    (Qwen2-MoE's shared_expert_gate), and, beside an `experts` child, a child named router or gate or
    whose weight has one row per expert (a plain nn.Linear router)."""
    found = set()
    for module in block.modules():
        if _is_router_class(module):
            found.update(id(inner) for inner in module.modules())
        count = _expert_count(module)
        for name, child in module.named_children():
            weight = getattr(child, "weight", None)
            rows = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
            if isinstance(child, nn.Linear) and child.out_features == 1:
                found.add(id(child))
            elif count is not None and name != "experts" and (name in ("router", "gate") or rows == count):
                found.update(id(inner) for inner in child.modules())
    return found
