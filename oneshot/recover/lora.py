"""LoRA through `peft`, for recovery that keeps the pruned zero pattern.

Adapters (default r=8, alpha=16 on the query and value projections: Wanda's recipe) train while the
pruned weights stay frozen; at the end they are merged into the weights (`merge_and_unload`) and the
masks are re-applied by the caller, because a dense update B @ A would otherwise refill every pruned
weight (locuslab/wanda#83: 40% sparse became 32.7% after merging). Which layers are "query" and
"value" comes from the family's structure map; peft is imported only when LoRA is used.
"""
from __future__ import annotations

from torch import nn

from ..models import ModelError, decoder_blocks, prunable_layers

DEFAULT_R = 8
DEFAULT_ALPHA = 16
DEFAULT_DROPOUT = 0.05
FALLBACK_TARGETS = ("q_proj", "v_proj")


class LoraError(ValueError):
    """LoRA settings that cannot apply to this model; the message says what to change."""


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The query and value projections' names inside a block (a fused qkv layer when the family has one)."""
    from ..models import structure_map

    try:
        attention = structure_map(model).attention
    except (ModelError, KeyError, AttributeError):
        return FALLBACK_TARGETS
    names = (attention.qkv,) if attention.qkv else (attention.q, attention.v)
    return tuple(f"{attention.module}.{name}" if not name.startswith(attention.module + ".") else name
                 for name in names)


def matching_layers(model: nn.Module, targets) -> dict[str, list[str]]:
    """target -> the block layers (names inside block 0) it matches, as peft matches names: the whole
    name or its ending after a dot."""
    layers = list(prunable_layers(decoder_blocks(model)[0]))
    return {target: [n for n in layers if n == target or n.endswith("." + target)] for target in targets}


def check_targets(model: nn.Module, targets, flag: str = "--lora-targets") -> tuple[str, ...]:
    """The targets, each matching at least one linear layer of the blocks; else LoraError."""
    targets = tuple(targets) if targets else default_targets(model)
    matched = matching_layers(model, targets)
    missing = [t for t, found in matched.items() if not found]
    if missing:
        choices = ", ".join(prunable_layers(decoder_blocks(model)[0]))
        raise LoraError(f"{flag} {','.join(missing)} match no linear layer of this model's blocks; choose from: "
                        f"{choices}")
    return targets


def wrap(model: nn.Module, targets, r: int = DEFAULT_R, alpha: int = DEFAULT_ALPHA,
         dropout: float = DEFAULT_DROPOUT) -> nn.Module:
    """The model with adapters on `targets` (only they train); the adapters' A draws from torch's RNG."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LoraError("--mode lora needs the peft package: pip install 'oneshot[recover]'") from None
    import warnings

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def merge(wrapped: nn.Module) -> nn.Module:
    """The plain model with the adapters added into its weights (dense: re-apply the masks after)."""
    return wrapped.merge_and_unload()
