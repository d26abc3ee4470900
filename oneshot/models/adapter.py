"""The family adapter: the one place that knows where each family keeps its decoder blocks and
linear layers, that GPT-2's Conv1D stores its weight transposed, that fused mixture-of-experts tensors
are one layer per expert (`experts.py`), and which modules are routers (never pruned).

Embeddings, rotary tables and masks need no per-family code: the engine catches whatever the model
passes its blocks. Which layers are coupled (heads, KV groups, MLP channels) is in `structure.py`.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UsageError
from .experts import ExpertProjection, expert_projections, is_fused_experts, routers


class ModelError(UsageError):
    """A model that cannot be loaded or understood; the message says what to change."""


_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers (Gemma 3 and others)
    "transformer.blocks",  # MPT
)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks, in order."""
    for path in _BLOCK_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == expected]
    if len(candidates) == 1:
        return candidates[0]
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}; add its path to _BLOCK_PATHS")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) is a linear layer with weight stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The layers we prune inside a block, by qualified name: linear layers that are not routers, and
    each expert's projections in fused experts ("mlp.experts.7.down_proj", an ExpertProjection)."""
    skip = routers(block)
    layers = {}
    for name, module in block.named_modules():
        if (isinstance(module, nn.Linear) or _is_conv1d(module)) and id(module) not in skip:
            layers[name] = module
        elif is_fused_experts(module):
            layers.update({f"{name}.{key}": view for key, view in expert_projections(module).items()})
    return layers


def layer_parameter(layer: nn.Module) -> nn.Parameter:
    """The parameter a prunable layer's weight lives in (for an expert: the whole fused tensor)."""
    return layer.fused if isinstance(layer, ExpertProjection) else layer.weight


def weight_matrix(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """The [outputs, inputs] view of `tensor`, shaped like the parameter the layer's weight lives in (the
    parameter's data, its gradient, a mask over it): an expert's rows of a fused tensor, Conv1D's transpose."""
    if isinstance(layer, ExpertProjection):
        return layer._matrix(tensor)
    return tensor.t() if _is_conv1d(layer) else tensor


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as [outputs, inputs], whatever the layer stores."""
    return weight_matrix(layer, layer_parameter(layer).data)


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Write a [outputs, inputs] weight back in the layer's own layout and dtype, in place."""
    if isinstance(layer, ExpertProjection):
        layer.write(weight)
        return
    target = layer.weight.data
    target.copy_(weight.t() if _is_conv1d(layer) else weight)


def block_weight_roles(block: nn.Module) -> dict[str, tuple[nn.Parameter, str]]:
    """Every weight of a block (parameters of two or more dimensions; stacked per-expert biases are
    biases, not weights) with its role: "pruned" (held by a prunable layer), "router", "norm",
    "embedding", or "other" (a weight the engine cannot prune: the run must say so)."""
    held = {id(layer_parameter(layer)) for layer in prunable_layers(block).values()}
    router_ids = routers(block)
    roles = {}
    for module_name, module in block.named_modules():
        kind = ("router" if id(module) in router_ids else "embedding" if isinstance(module, nn.Embedding)
                else "norm" if "norm" in type(module).__name__.lower() else None)
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() < 2 or name.endswith("bias"):
                continue
            role = "pruned" if id(parameter) in held else kind or "other"
            roles[f"{module_name}.{name}" if module_name else name] = (parameter, role)
    return roles


def weight_kind(name: str) -> str:
    """A block weight's name with expert and layer numbers replaced by '*': one line per kind."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


# Families whose own evaluations start every window with the beginning-of-text token: Gemma's models are
# trained with it at the start of every sequence, and without it their perplexity roughly triples (Gemma 3
# 270M, 8 x 256 windows of wiki-offline: 45.8 without, 15.0 with). The papers' protocol for Llama and OPT
# (Wanda, SparseGPT) cuts the tokenised text into windows with no token added, and stays the default.
_BOS_EVERY_WINDOW = {"gemma": "Gemma", "gemma2": "Gemma 2", "gemma3": "Gemma 3", "gemma3_text": "Gemma 3"}


def bos_every_window(model: nn.Module) -> bool:
    """The family's evaluation convention: whether each perplexity window starts with the BOS token."""
    return getattr(model.config, "model_type", None) in _BOS_EVERY_WINDOW
