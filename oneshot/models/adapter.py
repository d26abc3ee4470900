"""The family adapter: the one place that knows where each family keeps its decoder blocks and
linear layers, and that GPT-2's Conv1D stores its weight transposed.

Embeddings, rotary tables and masks need no per-family code: the engine catches whatever the model
passes its blocks. Which layers are coupled (heads, KV groups, MLP channels) is in `structure.py`.
"""
from __future__ import annotations

import torch
from torch import nn


class ModelError(ValueError):
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
    """Linear layers inside a block, by qualified name: the only weights we prune."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as [outputs, inputs], whatever the layer stores."""
    return layer.weight.data.t() if _is_conv1d(layer) else layer.weight.data


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Write a [outputs, inputs] weight back in the layer's own layout and dtype, in place."""
    target = layer.weight.data
    target.copy_(weight.t() if _is_conv1d(layer) else weight)


def model_family(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)
