"""Mixture-of-experts blocks: fused expert tensors as one layer per expert, and which modules are routers.

transformers 5 keeps a MoE block's experts in 3-D parameters (`gate_up_proj` [experts, 2 x intermediate,
hidden] and `down_proj` [experts, hidden, intermediate], or the transpose) and runs them in one fused
kernel, so no `nn.Linear` exists for the engine to hook or prune. Here each expert's projection becomes an
`ExpertProjection`: a module with no parameters of its own that reads and writes its expert's slice of
the fused tensor. While `routed_through_projections` is active, the experts run one expert at a time
through these modules, each on exactly the tokens the router sends to it, so the engine's ordinary input
hooks give every expert its own statistic. Outside that context the model runs its own fused forward.

One reading covers every family built on transformers' experts contract (`use_experts_implementation`:
the flags has_gate, has_bias, is_transposed, has_post_expert_norm and the `_apply_gate` rule); experts
stored any other way are not prunable here, and the run reports them as unpruned block weights.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F


class ExpertProjection(nn.Module):
    """One expert's projection inside a fused experts module: a layer whose weight is a slice."""

    def __init__(self, experts: nn.Module, parameter: str, index: int):
        super().__init__()
        # Plain attribute, not a submodule: the view owns no parameters, so the model's state dict,
        # .to() and save_pretrained never see it.
        object.__setattr__(self, "experts", experts)
        self.parameter, self.index = parameter, index

    @property
    def fused(self) -> nn.Parameter:
        """The 3-D parameter this projection is one slice of (read at call time: the block may move)."""
        return getattr(self.experts, self.parameter)

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.experts, "is_transposed", False))

    def weight(self) -> torch.Tensor:
        """[outputs, inputs], a view into the fused tensor."""
        w = self.fused.data[self.index]
        return w.t() if self.transposed else w

    def write(self, weight: torch.Tensor) -> None:
        self.fused.data[self.index].copy_(weight.t() if self.transposed else weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fused[self.index]
        bias = getattr(self.experts, f"{self.parameter}_bias")[self.index] if self.experts.has_bias else None
        return F.linear(x, w.t() if self.transposed else w, bias)

    def extra_repr(self) -> str:
        return f"{self.parameter}[{self.index}], {tuple(self.weight().shape)}"


def _first_projection(module: nn.Module) -> str | None:
    """'gate_up_proj' (gated experts) or 'up_proj', if `module` is fused experts we can read, else None."""
    if not all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return None  # not built on transformers' experts contract
    first = "gate_up_proj" if module.has_gate else "up_proj"
    tensors = [getattr(module, name, None) for name in (first, "down_proj")]
    if all(isinstance(t, nn.Parameter) and t.dim() == 3 and t.shape[0] == module.num_experts for t in tensors):
        return first
    return None


def is_fused_experts(module: nn.Module) -> bool:
    return _first_projection(module) is not None


def expert_projections(experts: nn.Module) -> dict[str, ExpertProjection]:
    """'{expert}.{projection}' -> its layer, expert by expert (first projection, then down_proj)."""
    first = _first_projection(experts)
    return {f"{e}.{name}": ExpertProjection(experts, name, e)
            for e in range(experts.num_experts) for name in (first, "down_proj")}


def _routed_forward(experts: nn.Module, pairs: list[tuple[nn.Module, nn.Module]], hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' computation, one expert at a time through its projection layers.

    Every expert is called, even with no tokens, so that its statistic counts every calibration chunk
    (N is the number of calibration sequences for every layer, as for dense layers).
    """
    out = torch.zeros_like(hidden_states)
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
    counts = torch.bincount(flat, minlength=len(pairs))[: len(pairs)].tolist()  # one host sync per call
    start = 0
    for (first, down), count in zip(pairs, counts):
        chosen, start = order[start:start + count], start + count
        token, slot = chosen // k, chosen % k
        h = first(hidden_states[token])
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        h = down(h)
        if getattr(experts, "has_post_expert_norm", False):
            h = experts.post_expert_norm(h)
        out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
    return out


@contextlib.contextmanager
def routed_through_projections(layers: Iterable[nn.Module]) -> Iterator[None]:
    """While active, every fused experts module that one of `layers` belongs to runs expert by expert
    through its ExpertProjection layers (the given ones, so hooks on them see each expert's tokens)."""
    given: dict[int, dict[tuple[int, str], ExpertProjection]] = {}
    owners: dict[int, nn.Module] = {}
    for layer in layers:
        if isinstance(layer, ExpertProjection):
            owners[id(layer.experts)] = layer.experts
            given.setdefault(id(layer.experts), {})[(layer.index, layer.parameter)] = layer
    patched = []
    try:
        for key, experts in owners.items():
            first = _first_projection(experts)
            chosen = given[key]  # projections without hooks (not asked for) are made fresh
            pairs = [tuple(chosen[(e, name)] if (e, name) in chosen else ExpertProjection(experts, name, e)
                           for name in (first, "down_proj"))
                     for e in range(experts.num_experts)]
            previous = experts.__dict__.get("forward")
            experts.forward = functools.partial(_routed_forward, experts, pairs)
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
